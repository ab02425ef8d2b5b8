"""ms-swift checkpoint keys -> this package's keys, one translation per tuner.

ms-swift names an adapter's modules ``<tuner>_<adapter name>`` and keeps some of them elsewhere than this
package does (Res-Tuning's bypass on the model root, LLaMA-PRO's blocks under expanded-model indices), so a
checkpoint's keys are rewritten before the usual key and shape checks. A tuner without an entry in
:data:`TRANSLATIONS` uses the keys as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from peft import PeftConfig
from torch import nn

from ..tuners.restuning.model import plan_adapter as plan_restuning
from ..tuners.side.layer import ROOT_SIDE_ATTR, SideLayer

Weights = dict[str, torch.Tensor]
#: ``(weights, adapter_name, config, model) -> weights``; ``model`` is the (unchanged) model to load into.
Translation = Callable[[Weights, str, PeftConfig, nn.Module], Weights]

_RESTUNING_KEY = re.compile(
    r"^restuning_(?P<adapter>.+?)\.bypass_blocks\.(?P<block>\d+)\.(?P<role>lateral|vertical|aux)_tuner\.tuner\.(?P<rest>.+)$"
)
_SCEDIT_KEY = re.compile(
    r"^(?P<path>.+)\.scetuner_(?P<adapter>.+?)\.tuner_op\.(?P<linear>ln1|ln2)\.(?P<rest>weight|bias)$"
)
_LLAMAPRO_KEY = re.compile(r"^(?P<list>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def state_dict_from_swift(
    tuner_name: str, weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module
) -> Weights:
    """An ms-swift checkpoint's tensors under this package's keys.

    Args:
        tuner_name: the registered tuner the checkpoint belongs to.
        weights: the checkpoint's tensors.
        adapter_name: the adapter name it was saved under.
        config: the adapter's config, already translated.
        model: the model it will be loaded into (not yet changed), for tuners whose key layout depends on
            where their targets are.
    """
    translate = TRANSLATIONS.get(tuner_name)
    return weights if translate is None else translate(weights, adapter_name, config, model)


def rename_swift_keys(
    weights: dict[str, torch.Tensor], swift_attr: str, adapter_name: str, containers: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Turn ``<path>.<swift_attr>.<sub>.<rest>`` keys into ``<path>.<containers[sub]>.<adapter_name>.<rest>``.

    Keys that do not have this form are kept as they are (the load then reports them as unexpected).
    A sub-name mapped from ``""`` matches every remaining sub-path (``<swift_attr>.<rest>``).
    """
    renamed = {}
    for key, tensor in weights.items():
        parts = key.split(".")
        if swift_attr not in parts:
            renamed[key] = tensor
            continue
        at = parts.index(swift_attr)
        path, rest = parts[:at], parts[at + 1 :]
        if rest and rest[0] in containers:
            new = [*path, containers[rest[0]], adapter_name, *rest[1:]]
        elif "" in containers:
            new = [*path, containers[""], adapter_name, *rest]
        else:
            new = parts
        renamed[".".join(new)] = tensor
    return renamed


def _adapter(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # <path>.adapter_<name>.linear1.* -> <path>.adapter_down.<name>.*
    containers = {"linear1": "adapter_down", "linear2": "adapter_up"}
    return rename_swift_keys(weights, f"adapter_{adapter_name}", adapter_name, containers)


def _prompt(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # <path>.prompt_<name>.prompt_token -> <path>.prompt_token.<name>
    return rename_swift_keys(weights, f"prompt_{adapter_name}", adapter_name, {"prompt_token": "prompt_token"})


def _side(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # <path>.side_<name>.side_net.* / .alpha -> <path>.side_net.<name>.* / <path>.side_alpha.<name>
    containers = {"side_net": "side_net", "alpha": "side_alpha"}
    renamed = rename_swift_keys(weights, f"side_{adapter_name}", adapter_name, containers)
    # ms-swift keeps a root-model side network at the top level (an empty module path); ours is a sub-module.
    on_root = tuple(f"{attr}.{adapter_name}" for attr in SideLayer.adapter_layer_names)
    return {f"{ROOT_SIDE_ATTR}.{k}" if k.startswith(on_root) else k: v for k, v in renamed.items()}


def _restuning(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # restuning_<a>.bypass_blocks.<i>.lateral_tuner.tuner.ln1.weight -> <target>.restuning_bypass.<a>.blocks.<i>...
    # ms-swift keeps the bypass on the model's root; here the target module's layer owns it.
    if not any(_RESTUNING_KEY.match(key) for key in weights):
        return weights
    target = plan_restuning(model, config).target
    translated = {}
    for key, value in weights.items():
        match = _RESTUNING_KEY.match(key)
        if match is None or match["adapter"] != adapter_name:
            raise ValueError(f"unexpected key {key!r} in an ms-swift Res-Tuning checkpoint of {adapter_name!r}")
        translated[
            f"{target}.restuning_bypass.{adapter_name}.blocks.{match['block']}.{match['role']}.{match['rest']}"
        ] = value
    return translated


def _scedit(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # <target>.scetuner_<a>.tuner_op.ln1.weight -> <target>.scedit_ln1.<a>.weight
    translated = {}
    for key, value in weights.items():
        match = _SCEDIT_KEY.match(key)
        if match is None:
            translated[key] = value
        else:
            translated[f"{match['path']}.scedit_{match['linear']}.{match['adapter']}.{match['rest']}"] = value
    return translated


def _llamapro(weights: Weights, adapter_name: str, config: PeftConfig, model: nn.Module) -> Weights:
    # ms-swift saves the new blocks under their expanded-model indices and puts one block after each group, so
    # the k-th saved index e (in order) is the block after original layer e - k - 1. The saved indices must be
    # evenly spaced: ms-swift selects blocks by substring (layer 1 also matches 10), and a checkpoint carrying
    # such extra layers is refused.
    by_list: dict[str, set[int]] = {}
    for key in weights:
        match = _LLAMAPRO_KEY.match(key)
        if match is None:
            raise ValueError(f"ms-swift LLaMA-PRO key {key!r} is not of the form '<layer list>.<index>.<name>'")
        by_list.setdefault(match["list"], set()).add(int(match["index"]))
    if len(by_list) != 1:
        raise ValueError(f"ms-swift LLaMA-PRO checkpoint spans several layer lists: {sorted(by_list)}")
    indices = sorted(next(iter(by_list.values())))
    spacing = indices[0] + 1
    if any(index != (k + 1) * spacing - 1 for k, index in enumerate(indices)):
        raise ValueError(
            f"ms-swift LLaMA-PRO checkpoint holds layers {indices}, which are not evenly spaced new blocks; "
            "ms-swift's substring selection may have saved original layers too (e.g. layer 10 with block 1)"
        )
    renamed = {}
    for key, tensor in weights.items():
        match = _LLAMAPRO_KEY.match(key)
        k = indices.index(int(match["index"]))
        original = int(match["index"]) - k - 1
        renamed[f"{match['list']}.{original}.llamapro_blocks.{adapter_name}.0.{match['rest']}"] = tensor
    return renamed


#: registered tuner name -> translation of its ms-swift checkpoint keys.
TRANSLATIONS: dict[str, Translation] = {
    "adapter": _adapter,
    "prompt": _prompt,
    "side": _side,
    "restuning": _restuning,
    "scedit": _scedit,
    "llamapro": _llamapro,
}
