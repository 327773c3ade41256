"""Performance measurement suite of the subspace LoRA adapters against the baselines.

``python -m benchmarks.perf.suite --out DIR`` measures and writes one JSON per measurement group
plus ``summary.json``; ``python -m benchmarks.perf.report DIR`` turns them into
``benchmarks/PERFORMANCE.md``.
"""
