"""Rows of the GPU check, relative errors, and step time / memory measured the same way on CUDA and CPU."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NEEDS_CUDA = "skipped: needs CUDA"


@dataclass
class Metric:
    """One measured error and the bound it must stay within.

    Args:
        name: what is compared, e.g. ``"loss"`` or ``"grad"``.
        value: the measured error (relative unless the name says otherwise).
        tolerance: the largest value that passes.
    """

    name: str
    value: float
    tolerance: float

    @property
    def ok(self) -> bool:
        # NaN fails: every comparison with it is False.
        return bool(self.value <= self.tolerance)


@dataclass
class Row:
    """One check: what ran, against what, with which errors and cost ratios.

    Args:
        check: short id, e.g. ``"liger-llama"`` or ``"adapter-llama/bf16"``.
        what: one line on what ran.
        reference: what the errors are measured against.
        metrics: the errors and their tolerances.
        status: ``"pass"``, ``"fail"``, ``"error: ..."`` or ``"skipped: ..."``; derived from metrics when empty.
        step_ratio: step time over the named ratio reference's, same model, same device and dtype.
        memory_ratio: peak memory over the ratio reference's.
        ratio_reference: what the ratios are taken against.
        details: any other figures (absolute times and bytes, trajectories).
    """

    check: str
    what: str
    reference: str = ""
    metrics: list[Metric] = field(default_factory=list)
    status: str = ""
    step_ratio: float | None = None
    memory_ratio: float | None = None
    ratio_reference: str = ""
    details: dict = field(default_factory=dict)

    def finish(self) -> Row:
        if not self.status:
            self.status = "pass" if self.metrics and all(m.ok for m in self.metrics) else "fail"
        return self

    def to_json(self) -> dict:
        return {
            "check": self.check,
            "what": self.what,
            "status": self.status,
            "reference": self.reference,
            "metrics": [
                {"name": m.name, "value": m.value, "tolerance": m.tolerance, "ok": m.ok} for m in self.metrics
            ],
            "step_ratio": self.step_ratio,
            "memory_ratio": self.memory_ratio,
            "ratio_reference": self.ratio_reference,
            "details": self.details,
        }


def guarded(check: str, what: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """Run one check; an exception becomes an ``error`` row carrying the traceback, so later checks still run."""
    try:
        return [row.finish() for row in fn()]
    except Exception as err:  # noqa: BLE001 - every failure is a finding to report, not a reason to stop
        message = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return [Row(check, what, status=message, details={"traceback": traceback.format_exc()[-4000:]})]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖ in float64 on the CPU (inf if the reference is zero and value is not)."""
    value, reference = value.detach().double().cpu().flatten(), reference.detach().double().cpu().flatten()
    denominator = reference.norm().item()
    difference = (value - reference).norm().item()
    if denominator == 0:
        return 0.0 if difference == 0 else float("inf")
    return difference / denominator


def max_relative_step_error(values: list[float], reference: list[float]) -> float:
    """The largest |value − reference| / |reference| over a trajectory (e.g. the loss of every step)."""
    if len(values) != len(reference):
        raise ValueError(f"trajectories differ in length: {len(values)} vs {len(reference)}")
    return max(abs(v - r) / max(abs(r), 1e-12) for v, r in zip(values, reference))


def ratio(value: float, reference: float) -> float | None:
    """``value / reference``, or None where the reference is zero (the dry run's CPU memory of a plain model)."""
    return value / reference if reference else None


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def release(device: torch.device | str) -> None:
    """Free what the previous configuration left, so the next one's CUDA memory figures are its own.

    Only on CUDA: a full collection takes ~0.3 s over transformers' many objects, and the dry run's CPU memory
    figure counts live tensors, not the allocator.
    """
    if is_cuda(device):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (shared storage counted once per tensor object)."""
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the model's parameters and buffers and the optimizer's state tensors."""
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(tensors)


@dataclass
class Cost:
    """Median step time and peak memory of one configuration.

    Args:
        step_s: median seconds of one step (synchronised on CUDA).
        peak_bytes: on CUDA the allocator's peak during a step (weights, optimizer state, gradients, activations
            and temporaries of this configuration); on CPU (the dry run) only the resident weights, buffers and
            optimizer state, which exercises the ratio code without pretending to be a measurement.
    """

    step_s: float
    peak_bytes: int

    def to_json(self) -> dict:
        return {"step_ms": self.step_s * 1e3, "peak_mib": self.peak_bytes / 2**20}


def measure_cost(
    step: Callable[[], object],
    device: torch.device | str,
    warmup: int,
    repeats: int,
    baseline_bytes: int = 0,
    resident: Callable[[], int] | None = None,
) -> Cost:
    """Time ``step`` (median of ``repeats`` after ``warmup``) and take its peak memory.

    Args:
        step: one full training step.
        device: where it runs.
        warmup: untimed steps first (compilation, optimizer state creation).
        repeats: timed steps.
        baseline_bytes: CUDA bytes allocated before the configuration was built, subtracted from the peak.
        resident: on CPU, the bytes the configuration holds between steps.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline_bytes
    else:
        peak = resident() if resident is not None else 0
    return Cost(statistics.median(times), peak)
