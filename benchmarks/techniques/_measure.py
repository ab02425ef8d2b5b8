"""Measurement helpers shared by the technique benchmarks."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).resolve().parents[1] / "results"


def peak_allocated_bytes(fn) -> tuple[int, object]:
    """Peak of bytes allocated by `fn` above what was allocated when it started, and its result.

    The CPU allocator keeps no statistics, so the allocation and free events that the profiler records
    (`profile_memory=True`) are replayed in time order; the running sum's maximum is the allocator's peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


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
