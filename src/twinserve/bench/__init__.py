"""Benchmarks: the engine against transformers in one process, and (later) load against an endpoint."""
