"""How big a tensor really is when FSDP2 or DeepSpeed ZeRO-3 keeps only a shard of it on this rank."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds only a shard of its values: an FSDP2 ``DTensor`` or a DeepSpeed ZeRO-3 parameter."""
    return isinstance(tensor, DTensor) or hasattr(tensor, "ds_id")


def full_numel(tensor: torch.Tensor) -> int:
    """The number of elements of the whole tensor, also when only a shard of it lives on this rank.

    A ``DTensor`` reports its global shape already; a ZeRO-3 parameter keeps its full size in ``ds_numel``.
    """
    return int(getattr(tensor, "ds_numel", tensor.numel()))
