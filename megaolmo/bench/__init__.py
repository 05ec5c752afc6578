"""Benchmarks: `python -m megaolmo.bench kernels` (fused kernels against the alternatives)."""
