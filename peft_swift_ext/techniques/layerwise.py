"""Per-parameter optimizers stepped during the backward pass, so that the model's gradients never coexist.

Each trainable parameter gets its own optimizer; a gradient hook steps it as soon as that parameter's gradient is
accumulated and frees the gradient right away. The Trainer (or a plain loop) holds a stand-in whose `step()` and
`zero_grad()` do nothing. Used by GaLore's `per_layer=True` and, for any torch optimizer, by
`create_layerwise_optimizer` (with LISA, gradients then take one parameter's memory instead of the active layers').
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.unwrap import unwrap_model


def create_layerwise_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    lr_scheduler_type: str = "constant",
    num_training_steps: int | None = None,
    num_warmup_steps: int = 0,
    **optim_kwargs: Any,
) -> tuple[LayerwiseStandIn, LayerwiseStandInScheduler]:
    """One `optimizer_cls` per trainable parameter of `model`, stepped by a gradient hook during backward.

    Returns `(optimizer, scheduler)` stand-ins for `Trainer(optimizers=...)` or a plain loop; their `step()` and
    `zero_grad()` do nothing (the hooks did the work). Gradients cannot be accumulated over several batches, and
    gradient clipping sees no gradients. Parameters that are frozen when the gradient arrives (LISA's refrozen
    layers) get no hook call, so their optimizers allocate no state.

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`; its parameters with `requires_grad` are optimised.
        optimizer_cls: the torch optimizer class each parameter gets.
        lr: learning rate.
        weight_decay: weight decay, passed to each optimizer.
        lr_scheduler_type: schedule of each parameter's learning rate, as in `transformers.get_scheduler`.
        num_training_steps: total steps, for schedules that need it.
        num_warmup_steps: warm-up steps of the schedule.
        optim_kwargs: other options of `optimizer_cls`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no trainable parameter")
    return _per_layer_optimizer(
        optimizer_cls, [{"params": params}], lr, weight_decay, optim_kwargs, lr_scheduler_type, num_training_steps,
        num_warmup_steps,
    )  # fmt: skip


def _per_layer_optimizer(optimizer_cls, groups, lr, weight_decay, optim_kwargs, schedule, total_steps, warmup):
    from transformers.optimization import get_scheduler

    optimizers, schedulers = {}, {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            optimizer = optimizer_cls(
                [{"params": [param], **options}], lr=lr, weight_decay=weight_decay, **optim_kwargs
            )
            optimizers[param] = optimizer
            schedulers[param] = get_scheduler(
                schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
            )

    def step_and_free(param):
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)
        schedulers[param].step()

    for param in optimizers:
        param.register_post_accumulate_grad_hook(step_and_free)
    stand_in = LayerwiseStandIn(optimizers, lr)
    return stand_in, LayerwiseStandInScheduler(stand_in, next(iter(schedulers.values())))


class LayerwiseStandIn(torch.optim.Optimizer):
    """What the Trainer sees when each parameter has its own optimizer: `step()` and `zero_grad()` do nothing,
    the work is done by gradient hooks.

    Args:
        optimizers: each parameter's own optimizer.
        lr: the learning rate reported to the Trainer (for logging).
    """

    def __init__(self, optimizers: dict[nn.Parameter, torch.optim.Optimizer], lr: float):
        super().__init__([torch.zeros(1)], {"lr": lr})
        self.optimizers = optimizers

    def step(self, closure=None) -> None:
        """Nothing: each parameter was already stepped by its gradient hook.

        Args:
            closure: ignored.
        """

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the hooks free each gradient right after its step.

        Args:
            set_to_none: ignored.
        """


class LayerwiseStandInScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler that only reports the learning rate of one per-parameter schedule (for logging).

    Args:
        stand_in: the `LayerwiseStandIn` the Trainer holds.
        representative: one per-parameter scheduler whose learning rate is reported.
    """

    def __init__(self, stand_in: LayerwiseStandIn, representative: torch.optim.lr_scheduler.LRScheduler):
        self.representative = representative
        super().__init__(stand_in)

    def get_lr(self) -> list[float]:
        """The representative schedule's current learning rate."""
        return self.representative.get_last_lr()[:1]
