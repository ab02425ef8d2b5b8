"""LoRA+ optimizer groups, for SwiftModel and for any PeftModel."""

from __future__ import annotations

import torch
from peft import PeftConfig, PeftModel
from peft.optimizers import create_loraplus_optimizer
from torch import nn


def lora_plus_group_of(
    config: PeftConfig, attr: str, param: torch.Tensor, lr: float | None, weight_decay: float
) -> tuple[str, dict] | None:
    """The LoRA+ group of one adapter parameter, or None when ``config`` is not LoRA+.

    Args:
        config: the adapter's config; LoRA+ when it has ``loraplus_lr_ratio``.
        attr: the container the parameter sits in (``lora_A``, ``lora_B``, ``lora_embedding_A``...).
        param: the parameter (1-D parameters such as DoRA magnitudes go with B, as in PEFT).
        lr: the base learning rate (that of A); required for LoRA+.
        weight_decay: weight decay of the decayed groups.
    """
    ratio = getattr(config, "loraplus_lr_ratio", None)
    if ratio is None:
        return None
    if lr is None:
        raise ValueError("create_optimizer_param_groups needs lr=... for LoRA+ adapters (B's lr is lr * ratio)")
    if attr.startswith("lora_embedding"):
        return "lora_plus_embedding", {"lr": config.loraplus_lr_embedding, "weight_decay": weight_decay}
    if attr == "lora_B":
        return "lora_plus_B", {"lr": lr * ratio, "weight_decay": weight_decay}
    if param.ndim == 1:
        return "lora_plus_B_no_decay", {"lr": lr * ratio, "weight_decay": 0.0}
    return "lora_plus_A", {"lr": lr, "weight_decay": weight_decay}


def create_lora_plus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *, lr: float, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer with LoRA+ learning rates for a ``PeftModel`` or ``SwiftModel``.

    The ratio and embedding learning rate come from the model's ``LoraPlusConfig``. Use it with the HF
    Trainer as ``Trainer(..., optimizers=(create_lora_plus_optimizer(model, lr=2e-4), None))``.

    Args:
        model: a PeftModel or SwiftModel holding at least one LoRA+ adapter.
        optimizer_cls: the optimizer class.
        lr: learning rate of the A matrices.
        **kwargs (Any): passed to the optimizer (``weight_decay`` also sets the groups' decay).
    """
    from ...swift.model import SwiftModel

    if isinstance(model, SwiftModel):
        groups = model.create_optimizer_param_groups(lr=lr, weight_decay=kwargs.get("weight_decay", 0.0))
        return optimizer_cls(groups, **{"lr": lr, **kwargs})
    if not isinstance(model, PeftModel):
        raise TypeError(f"create_lora_plus_optimizer needs a PeftModel or SwiftModel, got {type(model).__name__}")
    ratios = {
        (c.loraplus_lr_ratio, c.loraplus_lr_embedding)
        for c in model.peft_config.values()
        if hasattr(c, "loraplus_lr_ratio")
    }
    if len(ratios) != 1:
        raise ValueError(f"expected one LoRA+ configuration in the model, found {len(ratios)}")
    ratio, embedding_lr = ratios.pop()
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=ratio,
        loraplus_lr_embedding=embedding_lr,
        loraplus_weight_decay=kwargs.pop("weight_decay", 0.0),
        **kwargs,
    )
