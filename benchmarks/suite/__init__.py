"""Benchmark suite: every tuner's training cost, ours next to plain PEFT and ms-swift (``benchmarks/run_suite.py``).

``models``, ``measure`` and ``server`` import only torch, transformers and diffusers, so that the same files run
under ms-swift's own virtual environment; ``build_ours`` / ``build_swift`` hold each side's tuner configurations.
"""
