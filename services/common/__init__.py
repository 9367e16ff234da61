"""Shared parts of the distillery services: settings, Kafka, registry, metrics, gRPC bootstrap, stubs."""
