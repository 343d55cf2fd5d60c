"""Measuring the result: params, FLOPs, latency and memory, and the validation report."""
