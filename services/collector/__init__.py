"""Collector service: folds agents' event batches into build sessions (hot state in Redis)."""
