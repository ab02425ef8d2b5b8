"""Shared pieces of the reliability suite: saved checkpoints per contract case, snapshots of a model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_swift_ext import Swift, SwiftModel

from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter, state_hash

CASE_IDS = [case.id for case in ALL_CASES]
#: cases whose adapter holds weights (NEFTune has none, so key and shape cases do not apply)
WEIGHTED_CASES = [case for case in ALL_CASES if case.id != "neftune-llama"]
MERGEABLE_CASES = [case for case in ALL_CASES if case.mergeable]


def lora(targets=("q_proj", "v_proj"), r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False)


def swift_model_of(case, names=("first",)) -> SwiftModel:
    """The case's tuner under each name, randomised with a seed per name so it is not the identity."""
    model = Swift.prepare_model(case.make_model(), {name: case.make_config() for name in names})
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed=seed)
    return model.eval()


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def snapshot(model: nn.Module) -> tuple:
    """What must not change when a load fails: every tensor, the adapters and which are active."""
    if isinstance(model, SwiftModel):
        return state_hash(model.model), tuple(model.adapters), tuple(model.active_adapters)
    tuner_layers = sum(isinstance(module, BaseTunerLayer) for module in model.modules())
    return state_hash(model), tuner_layers


def cast_adapter(model: SwiftModel, adapter_name: str, dtype: torch.dtype) -> None:
    """Store one adapter's own floating tensors in ``dtype``; the base stays as it is.

    ``modules_to_save`` copies (LongLoRA's trainable norms) are copies of base modules and keep the base's
    dtype, as PEFT does when it casts adapters.
    """
    from peft_swift_ext.core.keys import adapter_containers, tuner_modules

    for _, module, attr, entry, _ in list(adapter_containers(tuner_modules(model.model), adapter_name)):
        if attr == "modules_to_save":
            continue
        container = getattr(module, attr)
        if isinstance(entry, nn.Parameter):
            if entry.is_floating_point():
                container[adapter_name] = nn.Parameter(entry.data.to(dtype), requires_grad=entry.requires_grad)
        elif isinstance(entry, torch.Tensor):
            if entry.is_floating_point():
                container[adapter_name] = entry.to(dtype)
        else:
            entry.to(dtype)
