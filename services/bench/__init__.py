"""Benchmarks and their peers, kept out of the service packages."""
