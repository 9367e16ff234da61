"""Benchmarks that span services: the scale benchmark's measurements."""
