"""``SwiftBaseTuner``: PEFT's ``BaseTuner`` with SWIFT's target semantics, for every plugin tuner."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.integrations import init_empty_weights
from torch import nn

from .layer import SwiftTunerLayer, adapter_parameters, follow_parent_mode
from .paths import canonical_path, find_target_modules, parent_of
from .rows import RowCountCheck, mixed_batch_call
from .scope import ScopedAdapters


class SwiftBaseTuner(RowCountCheck, ScopedAdapters, BaseTuner):
    """``BaseTuner`` for the plugin tuners: clear target errors and a clear refusal to merge.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and implement ``_create_and_replace``; they may extend
    ``_plan_targets`` (checks and planning before any change) and ``_finish_injection``.
    ``mergeable`` stays False for tuners that change activations rather than weights; ``wraps_root`` is True
    for tuners that can take the root model itself as their target (``target_modules=""``). ``has_weights`` is
    False for tuners whose adapters hold no tensors (NEFTune): ms-swift then writes no weights file for them.
    """

    mergeable = False
    wraps_root = False
    has_weights = True
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        """Plan and check every target first (clear errors, model untouched), then wrap or update each one.

        Targets are matched on module names without other tuners' ``base_layer`` segments, so an adapter can
        go on a module inside another tuner's layer, or around such a layer: a new layer wraps whatever sits at
        its target (a later adapter wraps an earlier one), except that an adapter joins this tuner's own layer
        when that layer is the outermost there.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            autocast_adapter_dtype: PEFT's option; applied by ``PeftModel`` after injection.
            low_cpu_mem_usage: create the adapter's weights on the meta device (to be filled by a load).
            state_dict: PEFT's option to derive targets from a checkpoint; refused (targets come from the config).
        """
        if state_dict is not None:
            raise ValueError(f"{type(self).__name__} takes its targets from the config, not from a state_dict")
        config = self.peft_config[adapter_name]
        targets = self._plan_targets(model, adapter_name, config)
        with init_empty_weights() if low_cpu_mem_usage else contextlib.nullcontext():
            for path in targets:
                parent, child = parent_of(model, path)
                target = model if path == "" else getattr(parent, child)
                self._create_and_replace(config, adapter_name, target, child, parent, current_key=canonical_path(path))
        self._finish_injection(model, adapter_name)
        follow_feature_sources(model)
        if "_nesting_hook" not in self.__dict__:
            self._nesting_hook = self.register_load_state_dict_pre_hook(self._keys_saved_under_other_nesting)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    # --- checkpoints written by PEFT's own save_pretrained ---------------------------------------------------------
    # A tensor's key in the model holds the `base_layer` segments of whatever layers wrap its module (an adapter of
    # this tuner inside another one's layer), so it depends on which adapters were there when it was saved. PEFT >=
    # 0.21 maps keys through the two class methods below both ways: its checkpoints get keys without those segments
    # and load into any nesting. Older PEFT saves the keys as they are; the load hook matches them without those
    # segments.

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        key = super()._remove_adapter_name_from_key(key, adapter_name)
        return canonical_path(key) if cls.prefix in key else key

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict
    ) -> dict:
        state_dict = {(canonical_path(key) if cls.prefix in key else key): value for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def _keys_saved_under_other_nesting(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        """Load pre-hook: this tuner's adapter keys that name another nesting load into the layers there now."""
        actual = {prefix + key for key in self.state_dict() if self.prefix in key}
        by_canonical = {canonical_path(key): key for key in actual}
        for key in [k for k in state_dict if k.startswith(prefix) and self.prefix in k and k not in actual]:
            target = by_canonical.get(canonical_path(key))
            if target is not None and target not in state_dict:
                state_dict[target] = state_dict.pop(key)

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
        """The module paths to wrap, in model order; every check that can fail runs here, before any change.

        Tuners that need more planning (their targets' sizes, feature sources, layer lists) extend this.
        """
        if getattr(config, "target_modules", None) is None:
            raise ValueError(f"{type(config).__name__}.target_modules must be set")
        targets = find_target_modules(model, config)
        for name in targets:
            self._validate_target(model.get_submodule(name) if name else model, name, config)
        return targets

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Around ``PeftModel.forward`` / ``generate``: ``adapter_names=[...]`` selects one adapter per row.

        The names are checked before anything runs (unknown names, training mode and merged adapters are refused,
        as in PEFT); the layers then apply each row's adapter in one pass (:mod:`peft_swift_ext.core.rows`).

        Args:
            *args (Any): the call's positional arguments (the batch's row count is checked when they hold it).
            **kwargs (Any): the call's keyword arguments; ``adapter_names`` and ``num_beams`` are read.
        """
        with mixed_batch_call(self, args, kwargs):
            yield

    def _validate_target(self, module: nn.Module, name: str, config: PeftConfig) -> None:
        """Raise a clear error if ``module`` (at path ``name``; the outermost tuner layer if one wraps it) cannot take
        this tuner; runs before anything is injected."""
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

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        """Work left after every target was wrapped (nothing by default)."""

    def _update_or_wrap(
        self, target: nn.Module, parent: nn.Module, target_name: str, new_layer, adapter_name: str, *args, **kwargs
    ) -> None:
        """Add ``adapter_name`` to ``target`` if it already is this tuner's layer, else to ``new_layer(target)``, put
        in its place; ``args`` and ``kwargs`` go to the layer's ``update_layer``."""
        layer = target if isinstance(target, self.tuner_layer_cls) else new_layer(target)
        layer.update_layer(adapter_name, *args, **kwargs)
        layer.scope_token = self.scope_token
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
        follow_parent_mode(layer, parent)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies child.weight/bias and moves by them; wrapped blocks have neither, and
        # update_layer already put the adapter on the base layer's device.
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        # Merge every layer first (safe_merge checks them all before unloading starts), then let the tuner undo
        # what it did outside its layers (LLaMA-PRO keeps its merged blocks as decoder layers), then take the
        # layers out as PEFT does. The model no longer holds adapters, so it must not keep their configs either:
        # a later get_peft_model would otherwise carry them along.
        if merge:
            self._check_merge_allowed()
            for module in list(self.model.modules()):
                if isinstance(module, self.tuner_layer_cls):
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.finalize_unload(merge)
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        forget_adapter_configs(model)
        return model

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
        # Only the active adapters train, and not those loaded for inference (inference_mode, is_trainable=False).
        for param in model.parameters():
            param.requires_grad = False
        for module in model.modules():
            if isinstance(module, self.tuner_layer_cls):
                for name in module.active_adapters:
                    if name in self.peft_config and self.peft_config[name].inference_mode:
                        continue
                    for param in adapter_parameters(module, name):
                        param.requires_grad = True


def follow_feature_sources(model: nn.Module) -> None:
    """Re-hook every feature source in ``model`` on the outermost layer now at its path.

    Res-Tuning's root and stem features and SCEdit's hints are what the model gets from those modules, i.e. the
    output of the outermost tuner layer wrapping them (a layer reading its own target reads what it wraps). Call
    this after any layer was put in or taken out.

    Args:
        model: the model whose tuner layers' source paths are relative to it.
    """
    for module in list(model.modules()):
        if isinstance(module, SwiftTunerLayer) and module.probes is not None:
            module.probes.follow(model, module)


def forget_adapter_configs(model: nn.Module) -> None:
    """Remove the ``peft_config`` that PEFT's tuners put on a model, once its adapters are gone."""
    if "peft_config" in vars(model):
        del model.peft_config
