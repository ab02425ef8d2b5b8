"""GaLore (gradient low-rank projection) optimizers from `galore-torch`, set up for a model in one call."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..core.paths import name_matches
from ..core.unwrap import get_input_embeddings, get_output_embeddings, unwrap_model
from .layerwise import LayerwiseStandIn, LayerwiseStandInScheduler, _per_layer_optimizer

__all__ = ["LayerwiseStandIn", "LayerwiseStandInScheduler", "create_galore_optimizer", "select_galore_parameters"]

_OPTIMIZERS = {"adamw": "GaLoreAdamW", "adafactor": "GaLoreAdafactor", "adamw8bit": "GaLoreAdamW8bit"}
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def select_galore_parameters(
    model: nn.Module, target_modules: str | list[str] | None = None, include_embeddings: bool = False
) -> list[nn.Parameter]:
    """The trainable matrices GaLore projects.

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`.
        target_modules: a regex matched in full against module names, or a list of names matched by suffix
            (PEFT's convention). None: every `nn.Linear` except the output head.
        include_embeddings: also project the input embeddings and the output head.
    """
    base = unwrap_model(model)
    head, embeddings = get_output_embeddings(base), get_input_embeddings(base)
    selected = []
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and module is not head and name_matches(name, target_modules):
            selected.append(module.weight)
    if include_embeddings:
        selected += [m.weight for m in (embeddings, head) if m is not None]
    unique = {id(p): p for p in selected if p.requires_grad and p.dim() == 2}
    if not unique:
        raise ValueError(f"target_modules={target_modules!r} selects no trainable 2-D weight in {type(base).__name__}")
    return list(unique.values())


def create_galore_optimizer(
    model: nn.Module,
    target_modules: str | list[str] | None = None,
    rank: int = 128,
    update_proj_gap: int = 50,
    scale: float = 1.0,
    proj_type: str = "std",
    optim: str = "adamw",
    per_layer: bool = False,
    include_embeddings: bool = False,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    lr_scheduler_type: str = "constant",
    num_training_steps: int | None = None,
    num_warmup_steps: int = 0,
    **optim_kwargs,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Build a GaLore optimizer over all trainable parameters of `model`.

    Returns `(optimizer, scheduler)`, ready for `Trainer(optimizers=...)`. `scheduler` is None (the Trainer
    makes one) unless `per_layer`, where each parameter has its own optimizer stepped by a hook as soon as its
    gradient is ready (gradients of the whole model never coexist) and a no-op optimizer and scheduler stand
    in for them; per-layer updates cannot accumulate gradients over several batches.

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`.
        target_modules: which matrices are projected (see `select_galore_parameters`); other trainable
            parameters get the same optimizer without projection.
        include_embeddings: also project embedding matrices (see `select_galore_parameters`).
        rank: rank of the gradient projection.
        update_proj_gap: steps between two SVDs refreshing the projection.
        scale: factor applied to the projected-back update.
        proj_type: `'std'`, `'reverse_std'`, `'right'`, `'left'` or `'full'`, as in galore-torch.
        optim: `'adamw'`, `'adafactor'` or `'adamw8bit'` (bitsandbytes, CUDA only).
        per_layer: one optimizer per parameter, stepped during backward.
        lr: the optimizer's learning rate.
        weight_decay: the optimizer's (decoupled) weight decay.
        lr_scheduler_type: with `per_layer`, the learning-rate schedule's name, as in `transformers.get_scheduler`.
        num_training_steps: with `per_layer`, the schedule's length in steps.
        num_warmup_steps: with `per_layer`, the schedule's warm-up steps.
        **optim_kwargs (Any): passed to the optimizer.
    """
    if optim not in _OPTIMIZERS:
        raise ValueError(f"optim must be one of {sorted(_OPTIMIZERS)}, got {optim!r}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    if rank < 1 or update_proj_gap < 1:
        raise ValueError(f"rank and update_proj_gap must be positive, got {rank} and {update_proj_gap}")
    galore_params = select_galore_parameters(model, target_modules, include_embeddings)
    if optim == "adamw8bit" and not all(p.is_cuda for p in galore_params):
        raise RuntimeError(
            "optim='adamw8bit' runs bitsandbytes' 8-bit kernels, which need the model on a CUDA GPU; "
            "use optim='adamw' or 'adafactor' here, or QGaLoreAdamW for low-memory states on any device"
        )
    try:
        optimizer_cls = getattr(importlib.import_module("galore_torch"), _OPTIMIZERS[optim])
    except ImportError as err:
        raise ImportError("create_galore_optimizer needs galore-torch: pip install 'peft-swift-ext[galore]'") from err
    if optim == "adafactor":
        # A given lr means a fixed schedule, not Adafactor's relative step size.
        optim_kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **optim_kwargs}
    galore_options = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    galore_ids = {id(p) for p in galore_params}
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in galore_ids]
    groups = [{"params": galore_params, **galore_options}]
    if other_params:
        groups.insert(0, {"params": other_params})
    if not per_layer:
        return optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **optim_kwargs), None
    return _per_layer_optimizer(
        optimizer_cls, groups, lr, weight_decay, optim_kwargs, lr_scheduler_type, num_training_steps, num_warmup_steps
    )
