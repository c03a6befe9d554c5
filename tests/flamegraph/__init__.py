"""Tests of buildtel.shared.flamegraph (a package so its module names cannot clash)."""
