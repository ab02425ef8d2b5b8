"""Optimizer parameter groups for a model with adapters of several types."""

from __future__ import annotations

import re
from collections.abc import Iterable

from peft import PeftConfig
from torch import nn

from ..core.contract import InPlaceTuner, OptimizerGroupPolicy
from ..core.keys import adapter_tensors

_NO_DECAY = re.compile(r"(^|\.)(bias|[^.]*norm[^.]*\.weight|[^.]*ln[^.]*\.weight)$", re.IGNORECASE)


def param_groups(
    model: nn.Module,
    configs: dict[str, PeftConfig],
    in_place: Iterable[InPlaceTuner],
    **defaults,
) -> list[dict]:
    """Groups of a config's own (LoRA+), then decay / no-decay groups for every other trainable parameter.

    Args:
        model: the shared base model.
        configs: adapter name -> config, in order.
        in_place: the tuners of trainable in-place adapters (LISA): the optimizer must hold every layer they may
            draw, trainable now or not.
        **defaults (Any): group defaults such as ``lr`` and ``weight_decay``.
    """
    lr = defaults.get("lr")
    weight_decay = defaults.get("weight_decay", 0.0)
    groups: dict[str, dict] = {}
    owner: dict[int, str] = {}

    def claim(group_key: str, param: nn.Parameter, **options) -> None:
        if id(param) in owner:
            raise ValueError(f"a parameter is claimed by both '{owner[id(param)]}' and '{group_key}' groups")
        owner[id(param)] = group_key
        groups.setdefault(group_key, {**defaults, **options, "params": []})["params"].append(param)

    def claim_plain(key: str, param: nn.Parameter) -> None:
        decay = _NO_DECAY.search(key) is None and param.ndim > 1
        claim("decay" if decay else "no_decay", param, weight_decay=weight_decay if decay else 0.0)

    for name, config in configs.items():
        for slot, (key, tensor) in adapter_tensors(model, name).items():
            if not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
                continue
            if isinstance(config, OptimizerGroupPolicy):
                group_key, options = config.optimizer_group(slot.attr, tensor, lr, weight_decay)
                claim(f"{group_key}:{name}", tensor, **options)
            else:
                claim_plain(key, tensor)
    candidates = {id(param) for tuner in in_place for param in tuner.trainable_parameters(all_candidates=True)}
    for key, param in model.named_parameters():
        if (param.requires_grad or id(param) in candidates) and id(param) not in owner:
            claim_plain(key, param)
    return list(groups.values())
