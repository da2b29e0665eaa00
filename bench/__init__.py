"""Benchmarks: one command each, printing a table (see docs/performance.md)."""
