"""Measurement helpers shared by the technique benchmarks."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared peak-memory measurement
from peak_memory import peak_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def peak_allocated_bytes(fn) -> tuple[int, object]:
    """Peak of bytes allocated by `fn` above what was allocated when it started, and its result."""
    results = []
    peak = peak_bytes(lambda: results.append(fn()))
    return peak, results[0]


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_result(name: str, result: dict) -> None:
    result = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
