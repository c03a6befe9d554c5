"""The Build Event Service endpoint: Bazel streams its Build Event Protocol here (docs/bazel.md)."""
