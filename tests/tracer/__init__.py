"""Tests of W3C Trace Context propagation and the conformance testpoint."""
