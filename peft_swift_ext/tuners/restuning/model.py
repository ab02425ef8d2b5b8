from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ...core.paths import PatternMatcher, canonical_module_names, module_at
from ...core.probes import ProbeSource
from ...core.tuner import SwiftBaseTuner
from ...core.widths import feature_width
from .config import ResTuningConfig
from .layer import ResTuningLayer
from .spec import BlockSpec, block_specs


@dataclass
class ResTuningPlan:
    """Everything one Res-Tuning adapter needs, resolved and checked before the model is changed."""

    target: str
    sources: list[ProbeSource]
    specs: list[BlockSpec]


class ResTuningModel(SwiftBaseTuner):
    """Injects Res-Tuning: wraps the target module in a :class:`ResTuningLayer` that owns the bypass.

    Root and stem modules are not wrapped (so other tuners can still target modules inside them); the
    target layer hooks them and removes its hooks when its adapter is deleted or the model is unloaded.
    """

    prefix = "restuning_"
    tuner_layer_cls = ResTuningLayer

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: ResTuningConfig) -> list[str]:
        # The bypass's target and the modules it reads features from, resolved and checked before any change.
        plan = plan_adapter(model, config)
        self._plans = {**getattr(self, "_plans", {}), adapter_name: plan}
        return [plan.target]

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        plan = self._plans.pop(adapter_name)
        self._update_or_wrap(
            target,
            parent,
            target_name,
            ResTuningLayer,
            adapter_name,
            plan.specs,
            plan.sources,
            peft_config.target_modules_hook,
            peft_config.target_hidden_pos,
            current_key,
        )


def plan_adapter(model: nn.Module, config: ResTuningConfig) -> ResTuningPlan:
    """Resolve root, stems and target of ``config`` on ``model`` and check them; ``ValueError`` names the field."""
    names = canonical_module_names(model)
    stems = _stem_names(names, config.stem_modules)
    root = None
    if config.root_modules is not None:
        matcher = PatternMatcher(config.root_modules, "ResTuningConfig.root_modules")
        root = next((name for name in names if matcher.matches(name)), None)
        if root is None:
            raise ValueError(f"ResTuningConfig.root_modules={config.root_modules!r} matches no module{_sample(names)}")
    targets = [name for name in names if check_target_module_exists(config, name)]
    if len(targets) != 1:
        found = f"matches {targets[:6]}" if targets else f"matches no module{_sample(names)}"
        raise ValueError(
            f"ResTuningConfig.target_modules={config.target_modules!r} must select one module; it {found}"
        )
    target = targets[0]
    target_module = module_at(model, target)
    if isinstance(target_module, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"ResTuningConfig.target_modules selects '{target}', a container; select a module that runs")
    specs = block_specs(config, len(stems))
    if root is None:
        sources = [ProbeSource(stems[0], module_at(model, stems[0]), "input")]
    else:
        sources = [ProbeSource(root, module_at(model, root), config.root_modules_hook)]
    sources += [ProbeSource(name, module_at(model, name), config.stem_modules_hook) for name in stems]
    _check_widths(config, sources, specs, target, target_module)
    return ResTuningPlan(target, sources, specs)


def _stem_names(names: list[str], stem_modules: str | list[str]) -> list[str]:
    if isinstance(stem_modules, str):
        matcher = PatternMatcher(stem_modules, "ResTuningConfig.stem_modules")
        stems = [name for name in names if matcher.matches(name)]
        if not stems:
            raise ValueError(f"ResTuningConfig.stem_modules={stem_modules!r} matches no module{_sample(names)}")
        return stems
    missing = [name for name in stem_modules if name not in names]
    if missing:
        raise ValueError(
            f"ResTuningConfig.stem_modules names modules the model does not have: {missing}{_sample(names)}"
        )
    return list(stem_modules)


def _check_widths(
    config: ResTuningConfig, sources: list[ProbeSource], specs: list[BlockSpec], target: str, target_module: nn.Module
) -> None:
    """Compare ``dims`` with the widths that can be known before running the model."""
    root_width = feature_width(sources[0].module, sources[0].where)
    if root_width is not None and specs[0].vertical.kind not in ("zero", "identity") and root_width != specs[0].dim:
        raise ValueError(
            f"ResTuningConfig.dims[0]={specs[0].dim} does not fit the root feature of '{sources[0].name}' "
            f"({root_width} channels)"
        )
    for index, (source, spec) in enumerate(zip(sources[1:], specs)):
        width = feature_width(source.module, source.where)
        if width is not None and spec.lateral.kind not in ("zero", "identity") and width != spec.dim:
            raise ValueError(
                f"ResTuningConfig.dims[{index}]={spec.dim} does not fit stem '{source.name}' ({width} channels)"
            )
    target_width = feature_width(target_module, config.target_modules_hook)
    if target_width is not None and target_width != specs[-1].out_width():
        raise ValueError(
            f"ResTuningConfig.dims: the bypass ends with {specs[-1].out_width()} channels but the "
            f"{config.target_modules_hook} of target '{target}' has {target_width}"
        )


def _sample(names: list[str]) -> str:
    return "; module names look like: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
