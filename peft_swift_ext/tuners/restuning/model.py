from __future__ import annotations

import re
from dataclasses import dataclass

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from ...core.paths import base_module_names
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
    _plan: ResTuningPlan | None = None

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Plan the bypass (its target and the modules it reads features from), then wrap the target.

        The plan is checked before the model changes; ``target_modules`` keeps the user's value.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            **kwargs (Any): passed to PEFT's ``BaseTuner.inject_adapter``.
        """
        config = self.peft_config[adapter_name]
        plan = plan_adapter(model, config)
        targets = config.target_modules
        self._plan = plan
        try:
            BaseTuner.inject_adapter(self, model, adapter_name, **kwargs)
        finally:
            self._plan = None
            config.target_modules = targets  # PEFT may rewrite long target lists; keep the user's

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:
        return self._plan is not None and key == self._plan.target

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        plan = self._plan
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
    names = [name for name in base_module_names(model) if "base_layer" not in name.split(".")]
    stems = _stem_names(names, config.stem_modules)
    root = None
    if config.root_modules is not None:
        root = next((name for name in names if re.fullmatch(config.root_modules, name)), None)
        if root is None:
            raise ValueError(f"ResTuningConfig.root_modules={config.root_modules!r} matches no module{_sample(names)}")
    targets = [name for name in names if check_target_module_exists(config, name)]
    if len(targets) != 1:
        found = f"matches {targets[:6]}" if targets else f"matches no module{_sample(names)}"
        raise ValueError(
            f"ResTuningConfig.target_modules={config.target_modules!r} must select one module; it {found}"
        )
    target = targets[0]
    target_module = model.get_submodule(target)
    if isinstance(target_module, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"ResTuningConfig.target_modules selects '{target}', a container; select a module that runs")
    specs = block_specs(config, len(stems))
    if root is None:
        sources = [ProbeSource(stems[0], model.get_submodule(stems[0]), "input")]
    else:
        sources = [ProbeSource(root, model.get_submodule(root), config.root_modules_hook)]
    sources += [ProbeSource(name, model.get_submodule(name), config.stem_modules_hook) for name in stems]
    _check_widths(config, sources, specs, target, target_module)
    return ResTuningPlan(target, sources, specs)


def _stem_names(names: list[str], stem_modules: str | list[str]) -> list[str]:
    if isinstance(stem_modules, str):
        stems = [name for name in names if re.fullmatch(stem_modules, name)]
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
