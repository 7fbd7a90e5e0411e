"""Benchmarks that reuse the real training path (``kdkit bench ...``)."""
