"""Benchmarks and their peers, kept out of the service packages (the scale benchmark, `distillery bench scale`)."""
