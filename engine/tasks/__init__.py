"""Benchmarks: examples, heads, losses, official metrics and submission files."""
