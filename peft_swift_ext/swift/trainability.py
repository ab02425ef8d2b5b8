"""Which tensors of a model with several adapters train, and SWIFT's one-line summary of them."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import freeze_non_trainable
from ..core.contract import InPlaceTuner
from ..core.keys import adapter_tensors
from ..core.sharding import full_numel


def refresh(model: nn.Module, trainable: set[str], in_place: list[tuple[str, InPlaceTuner]], active: set[str]) -> None:
    """Freeze everything, then make the trainable adapters' required tensors trainable again.

    Args:
        model: the shared base model.
        trainable: the adapters that train.
        in_place: ``(name, tuner)`` of every adapter whose tuner trains base weights in place (LISA).
        active: the active adapters (an inactive in-place adapter trains nothing).
    """
    for param in model.parameters():
        param.requires_grad = False
    for name in trainable:
        for slot, (_, tensor) in adapter_tensors(model, name).items():
            if slot.required and isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad = True
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            freeze_non_trainable(module)
    refresh_in_place(trainable, in_place, active)


def refresh_in_place(trainable: set[str], in_place: list[tuple[str, InPlaceTuner]], active: set[str]) -> None:
    """Make the base tensors that in-place tuners (LISA) train trainable, for trainable and active adapters.

    An inactive in-place adapter trains nothing (it can only be inactive before it has trained).
    """
    for name, tuner in in_place:
        on = name in trainable and name in active
        for param in tuner.trainable_parameters():
            param.requires_grad = on


def summary(model: nn.Module) -> str:
    """SWIFT's one-line summary: trainable and total parameters (full sizes when sharded), memory in use."""
    params = list(model.parameters())  # each parameter once
    total = sum(full_numel(param) for param in params)
    trainable = sum(full_numel(param) for param in params if param.requires_grad)
    percent = 100 * trainable / total if total else 0.0
    label, gib = _memory_in_use()
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f} || "
        f"{label}: {gib:.2f}GiB."
    )


def _memory_in_use() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "cuda memory", torch.cuda.memory_allocated() / 2**30
    try:
        import psutil
    except ImportError:
        import resource

        return "cpu peak resident memory", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return "cpu resident memory", psutil.Process().memory_info().rss / 2**30
