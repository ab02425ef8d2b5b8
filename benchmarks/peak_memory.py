"""Peak memory of one call, the one measurement every benchmark here shares.

On CUDA the allocator's own peak statistic is used. The CPU allocator keeps no statistics, so the allocation
and free events of ``torch.profiler.profile(profile_memory=True)`` are replayed in time order and the running
sum's maximum taken, counting only the frees of blocks allocated during the call: a block allocated before it
(parameters, optimizer states, or tensors a library kept from the previous step, as ms-swift's Res-Tuning keeps
its last features on the probed modules) counts as held for the whole call. Without that rule the figure depended
on the profiler's history: the CPU allocator reports no free of a block allocated before the process's first
profiling, but does report it for blocks allocated during an earlier profiling, so a second measurement of the
same step came out lower by whatever the step freed from before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started.

    On CPU, memory that ``fn`` frees but did not allocate stays counted (see the module docstring); on CUDA the
    allocator's figure is used as it is, so there such memory lowers the result.

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
    # The event tree's allocation nodes carry the block's address, which the flat event list does not.
    # At equal times frees go first: an address is only reused once it has been freed.
    events = _allocations(prof.profiler.kineto_results.experimental_event_tree())
    events.sort(key=lambda event: (event[0], event[2] > 0))
    allocated: dict[int, int] = {}  # address -> bytes of the blocks allocated during fn and not freed yet
    live = peak = 0
    for _, address, nbytes in events:
        if nbytes >= 0:
            allocated[address] = nbytes
            live += nbytes
            peak = max(peak, live)
        elif address in allocated:
            live -= allocated.pop(address)
    return peak


def _allocations(nodes) -> list[tuple[int, int, int]]:
    """(time in ns, address, bytes: negative for a free) of every allocator event under ``nodes``."""
    found, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            found.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return found
