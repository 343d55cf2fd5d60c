"""Deciding per-layer levels: sensitivity scans, latency tables, allocation to a target, search."""
