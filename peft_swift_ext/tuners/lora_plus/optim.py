"""A LoRA+ optimizer for any PeftModel, or for a model that builds its own groups (a SwiftModel)."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from ...core.contract import OptimizerGroupSource


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
    if isinstance(model, OptimizerGroupSource):
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
