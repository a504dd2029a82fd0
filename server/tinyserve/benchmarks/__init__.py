"""Benchmark programs (each prints ONE JSON object as its last line). Run via `tinyserve bench`."""
