"""Tests of services.flamegraph (a package so its module names cannot clash)."""
