"""Peak memory of one call, the one measurement every benchmark here shares.

On CUDA the allocator's own peak statistic is used. The CPU allocator keeps no statistics, so the allocation
and free events of ``torch.profiler.profile(profile_memory=True)`` are replayed in time order and the running
sum's maximum taken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started.

    Args:
        fn: the work to measure (e.g. one training step).
        device: where its tensors live; ``cuda`` devices use the allocator's peak, anything else the profiler.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
