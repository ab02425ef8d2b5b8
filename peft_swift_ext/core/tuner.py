"""``SwiftBaseTuner``: PEFT's ``BaseTuner`` with SWIFT's target semantics, for every plugin tuner."""

from __future__ import annotations

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .layer import adapter_parameters, follow_parent_mode
from .paths import find_target_modules


class SwiftBaseTuner(BaseTuner):
    """``BaseTuner`` for the plugin tuners: clear target errors and a clear refusal to merge.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and implement ``_create_and_replace``.
    ``mergeable`` stays False for tuners that change activations rather than weights; ``wraps_root`` is True
    for tuners that can take the root model itself as their target (``target_modules=""``).
    """

    mergeable = False
    wraps_root = False
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if getattr(peft_config, "target_modules", None) is None:
            raise ValueError(f"{type(peft_config).__name__}.target_modules must be set")
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Check every targeted module first (clear errors, model untouched), then wrap them as PEFT does.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            **kwargs (Any): passed to PEFT's ``BaseTuner.inject_adapter`` (``autocast_adapter_dtype``,
                ``low_cpu_mem_usage``, ...).
        """
        config = self.peft_config[adapter_name]
        targets = find_target_modules(model, config)
        for name in targets:
            self._validate_target(model.get_submodule(name), name, config)
        if targets != [""]:
            super().inject_adapter(model, adapter_name, **kwargs)
            return
        # PEFT reads target_modules='' as "no targets given": attach to the root here, then do its housekeeping.
        self._create_and_replace(config, adapter_name, model, "", model, current_key="")
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _validate_target(self, module: nn.Module, name: str, config: PeftConfig) -> None:
        """Raise a clear error if ``module`` cannot take this tuner; runs before anything is injected."""
        if name == "" and not self.wraps_root:
            raise ValueError(
                f"{type(config).__name__}.target_modules='' selects the root model, which "
                f"{self.tuner_layer_cls.tuner_name} cannot wrap; target its sub-modules instead"
            )
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(
                f"{type(config).__name__}.target_modules selects '{name}', a {type(module).__name__}; "
                "target the blocks inside it instead"
            )

    def _update_or_wrap(
        self, target: nn.Module, parent: nn.Module, target_name: str, new_layer, adapter_name: str, *args, **kwargs
    ) -> None:
        """Add ``adapter_name`` to ``target`` if it already is this tuner's layer, else wrap it first.

        Args:
            target, parent, target_name: as PEFT passes them to ``_create_and_replace``.
            new_layer: builds this tuner's layer around a module.
            adapter_name, args, kwargs: passed to the layer's ``update_layer``.
        """
        layer = target if isinstance(target, self.tuner_layer_cls) else new_layer(target)
        layer.update_layer(adapter_name, *args, **kwargs)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
        follow_parent_mode(layer, parent)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies child.weight/bias and moves by them; wrapped blocks have neither, and
        # update_layer already put the adapter on the base layer's device.
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        self.finalize_unload(merge)
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Tidy up outside the layers after ``adapter_name`` was deleted (nothing by default).

        Args:
            adapter_name: the adapter that was just deleted.
        """

    def finalize_unload(self, merged: bool) -> None:
        """Undo what the tuner attached outside its layers (hooks on other modules) before the layers go.

        Args:
            merged: whether the adapters were merged first (tuners that add modules keep them then).
        """
        for module in list(self.model.modules()):  # a probe may take its layer out of the tree
            if isinstance(module, self.tuner_layer_cls):
                module.remove_probes()

    def _check_merge_allowed(self) -> None:
        if not self.mergeable:
            raise ValueError(
                f"{self.tuner_layer_cls.tuner_name} adapters cannot be merged into the base model; "
                "use unload() to remove them instead"
            )
        super()._check_merge_allowed()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False
        for module in model.modules():
            if isinstance(module, self.tuner_layer_cls):
                for name in module.active_adapters:
                    for param in adapter_parameters(module, name):
                        param.requires_grad = True
