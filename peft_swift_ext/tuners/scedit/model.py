from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.paths import PatternMatcher, canonical_module_names, module_at
from ...core.probes import ProbeSource
from ...core.tuner import SwiftBaseTuner
from ...core.widths import feature_width
from .config import SCEditConfig
from .layer import SCEditLayer


@dataclass
class SCEditTarget:
    """One resolved target: where it is, how many channels its tuner edits, and its hint module."""

    name: str
    dim: int
    hint: ProbeSource | None


class SCEditModel(SwiftBaseTuner):
    """Injects SCEdit: wraps each target module in an :class:`SCEditLayer`."""

    prefix = "scedit_"
    tuner_layer_cls = SCEditLayer

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: SCEditConfig) -> list[str]:
        # Which modules, their channel counts and hints, resolved and checked before any change.
        plan = {target.name: target for target in plan_adapter(model, config)}
        self._plans = {**getattr(self, "_plans", {}), adapter_name: plan}
        return list(plan)

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        self._plans.pop(adapter_name, None)

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        planned = self._plans[adapter_name][current_key]
        hidden = int(planned.dim * peft_config.down_ratio)
        self._update_or_wrap(
            target,
            parent,
            target_name,
            SCEditLayer,
            adapter_name,
            planned.dim,
            hidden,
            peft_config.tuner_mode,
            planned.hint,
            current_key,
        )


def plan_adapter(model: nn.Module, config: SCEditConfig) -> list[SCEditTarget]:
    """Resolve and check the targets, dims and hints of ``config`` on ``model``; ``ValueError`` names the field."""
    names = canonical_module_names(model)
    targets = [_last_module(model, name) for name in _select(names, config.target_modules, "target_modules")]
    if len(set(targets)) != len(targets):
        raise ValueError(f"SCEditConfig.target_modules selects a module twice: {targets}")
    dims = config.dims if isinstance(config.dims, list) else [config.dims] * len(targets)
    if len(dims) != len(targets):
        raise ValueError(
            f"SCEditConfig.dims has {len(dims)} entries but target_modules selects {len(targets)} modules: {targets}"
        )
    hints: list[ProbeSource | None] = [None] * len(targets)
    if config.hint_modules:
        hint_names = _select(names, config.hint_modules, "hint_modules")
        if len(hint_names) != len(targets):
            raise ValueError(
                f"SCEditConfig.hint_modules selects {len(hint_names)} modules but target_modules selects "
                f"{len(targets)}; give one hint module per target"
            )
        hints = [ProbeSource(name, module_at(model, name), "output") for name in hint_names]
    skips = unet_skip_channels(model)
    for index, (name, dim) in enumerate(zip(targets, dims)):
        _check_dim(config.tuner_mode, module_at(model, name), name, index, dim, skips.get(name))
    return [SCEditTarget(name, dim, hint) for name, dim, hint in zip(targets, dims, hints)]


def _select(names: list[str], pattern: str | list[str], field_name: str) -> list[str]:
    """ms-swift's matching: a regex (full match, model order) or a list of exact names (list order)."""
    if isinstance(pattern, str):
        matcher = PatternMatcher(pattern, f"SCEditConfig.{field_name}")
        selected = [name for name in names if matcher.matches(name)]
        if not selected:
            sample = ", ".join(names[:8])
            raise ValueError(
                f"SCEditConfig.{field_name}={pattern!r} matches no module; names look like: {sample}, ..."
            )
        return selected
    missing = [name for name in pattern if name not in names]
    if missing:
        raise ValueError(f"SCEditConfig.{field_name} names modules the model does not have: {missing}")
    return list(pattern)


def _last_module(model: nn.Module, name: str) -> str:
    """A ModuleList stands for its last module (recursively), as in ms-swift."""
    module = module_at(model, name)
    while isinstance(module, nn.ModuleList):
        if not len(module):
            raise ValueError(f"SCEditConfig.target_modules selects '{name}', an empty ModuleList")
        name, module = f"{name}.{len(module) - 1}", module[-1]
    if isinstance(module, nn.ModuleDict):
        raise ValueError(f"SCEditConfig.target_modules selects '{name}', a ModuleDict; select a module that runs")
    return name


def _check_dim(mode: str, module: nn.Module, name: str, index: int, dim: int, skip: int | None) -> None:
    if mode == "decoder":
        if skip is not None and skip != dim:
            raise ValueError(
                f"SCEditConfig.dims[{index}]={dim} does not fit the skip connection into '{name}', which carries "
                f"{skip} channels"
            )
        width = feature_width(module, "input")
        if width is not None and width <= dim:
            raise ValueError(
                f"SCEditConfig.dims[{index}]={dim} does not fit '{name}': its input has {width} channels, which must "
                "hold the hidden channels and then the skip channels"
            )
    else:
        width = feature_width(module, "output")
        if width is not None and width != dim:
            raise ValueError(f"SCEditConfig.dims[{index}]={dim} does not fit '{name}', which outputs {width} channels")


def unet_skip_channels(model: nn.Module) -> dict[str, int]:
    """Skip-connection channels into each up-block resnet of the diffusers UNets inside ``model``.

    A diffusers UNet pushes ``conv_in``'s output, every down-block resnet's and every downsampler's output on a
    stack, and each up-block resnet pops one and concatenates it after its hidden input.
    """
    found: dict[str, int] = {}
    for path, unet in model.named_modules():
        down_blocks, up_blocks = unet._modules.get("down_blocks"), unet._modules.get("up_blocks")
        conv_in = unet._modules.get("conv_in")
        if not (isinstance(down_blocks, nn.ModuleList) and isinstance(up_blocks, nn.ModuleList) and conv_in):
            continue
        stack = [feature_width(conv_in, "output")]
        for block in down_blocks:
            stack += [feature_width(resnet, "output") for resnet in getattr(block, "resnets", [])]
            stack += [feature_width(sampler, "output") for sampler in getattr(block, "downsamplers", None) or []]
        prefix = f"{path}." if path else ""
        skips = {}
        for b, block in enumerate(up_blocks):
            for r, _ in enumerate(getattr(block, "resnets", [])):
                skips[f"{prefix}up_blocks.{b}.resnets.{r}"] = stack.pop() if stack else None
        if not stack and None not in skips.values():  # the structure is the one described above
            found.update(skips)
    return found
