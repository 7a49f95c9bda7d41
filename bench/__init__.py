"""Throughput benchmarks: each arrow of bytes -> pixels -> views -> weights, measured alone."""
