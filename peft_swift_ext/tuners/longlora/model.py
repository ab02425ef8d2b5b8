"""LongLoRA as a PEFT tuner: LoRA's layers, embeddings and norms as modules_to_save, S²-Attn while active."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft import LoraModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...compat import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from ...core.lora_rows import ScopedLoraAdapters, install_row_hooks
from ...core.paths import PatternMatcher, parent_of
from ...core.rows import RowCountCheck, mixed_batch_call
from ...core.tuner import forget_adapter_configs
from . import attention
from .config import LongLoraConfig


class LongLoraModel(RowCountCheck, ScopedLoraAdapters, LoraModel):
    """LoRA whose model switches to shifted sparse attention in training while one of its adapters is active.

    Injection resolves ``embedder_and_normalizer`` to module names added to ``modules_to_save`` and sets the model
    config's ``_attn_implementation`` to the S² variant of its sdpa / eager attention; removing the last LongLoRA
    adapter (delete, unload, merge_and_unload) restores the original implementation.
    """

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Add the LoRA layers, make the embedder and normalisers trainable, and switch on S²-attention.

        Raises before the model changes if its attention implementation is neither ``sdpa`` nor ``eager``, or
        if ``embedder_and_normalizer`` matches no parameter.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            **kwargs (Any): passed to PEFT's ``BaseTuner.inject_adapter``.
        """
        config: LongLoraConfig = self.peft_config[adapter_name]
        model_config = getattr(model, "config", None)
        original = self.__dict__.get("_original_attention") or getattr(model_config, "_attn_implementation", None)
        if original not in attention.S2_IMPLEMENTATIONS and original not in attention.S2_IMPLEMENTATIONS.values():
            raise ValueError(
                f"LongLoRA's shifted sparse attention works with attn_implementation 'sdpa' or 'eager'; "
                f"{type(model).__name__} uses {original!r}. Load the model with attn_implementation='sdpa'"
            )
        trained = trainable_module_names(model, config.embedder_and_normalizer)
        if not trained:
            raise ValueError(
                f"LongLoraConfig.embedder_and_normalizer={config.embedder_and_normalizer!r} matches no parameter of "
                f"{type(model).__name__}"
            )
        config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(trained))
        super().inject_adapter(model, adapter_name, **kwargs)
        if "_original_attention" not in self.__dict__:
            self.__dict__["_original_attention"] = original
            model_config._attn_implementation = attention.S2_IMPLEMENTATIONS[original]
            attention.register_switch(model_config, self.active_group_rule)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        # mixed-adapter batches as LoRA+ runs them: its LoRA layers in one pass, the embedding / norm copies per row
        with mixed_batch_call(self, args, kwargs, prepare=install_row_hooks):
            yield

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) has its own model config: S²-Attn must be switched on for that one too.
        super().__setstate__(state)
        if "_original_attention" in self.__dict__:
            attention.register_switch(self.model.config, self.active_group_rule)

    def active_group_rule(self) -> tuple[float, int | None] | None:
        """``(group_size_ratio, group_size)`` of the first active LongLoRA adapter, or None when none is active.

        Activity is read from the LoRA layers themselves, so PEFT's disable_adapter and SwiftModel's
        (per-thread) activation switch S²-Attn together with the LoRA weights.
        """
        layer = self._probe_layer()
        if layer is None or layer.disable_adapters:
            return None
        for name in layer.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, LongLoraConfig):
                return config.group_size_ratio, config.group_size
        return None

    def _probe_layer(self) -> LoraLayer | None:
        # Any LoRA layer holding one of our adapters tells which are active; found once, not on every attention call.
        probe, ours = self.__dict__.get("_probe"), set(self.peft_config)
        if probe is None or not ours & set(probe.lora_A):
            probe = next((m for m in self.model.modules() if isinstance(m, LoraLayer) and ours & set(m.lora_A)), None)
            self.__dict__["_probe"] = probe  # a plain attribute, not a registered submodule
        return probe

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Restore the original attention once no LongLoRA adapter is left (SwiftModel calls this on delete).

        Args:
            adapter_name: the adapter that was deleted.
        """
        if not self.peft_config:
            self._restore_attention()

    def finalize_unload(self, merged: bool) -> None:
        """SwiftModel's unload hook: the model goes back to its original attention.

        Args:
            merged: whether the LoRA weights were merged first (the attention is restored either way).
        """
        self._restore_attention()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter as PEFT does, then tidy what the tuner changed outside its layers.

        Args:
            adapter_name: the adapter to delete.
        """
        super().delete_adapter(adapter_name)
        self.remove_adapter_structures(adapter_name)

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs) -> nn.Module:
        if not merge:
            # PEFT's unload keeps the trained modules_to_save copies; unloading LongLoRA must give the base model
            # back, embeddings and norms included.
            for path, module in list(self.model.named_modules()):
                if isinstance(module, ModulesToSaveWrapper):
                    setattr(*parent_of(self.model, path), module.original_module)
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        self._restore_attention()
        forget_adapter_configs(model)  # peft < 0.19 leaves them on the unloaded model
        return model

    def _restore_attention(self) -> None:
        original = self.__dict__.pop("_original_attention", None)
        if original is not None:
            attention.unregister_switch(self.model.config)
            self.model.config._attn_implementation = original


def trainable_module_names(model: nn.Module, selector: str | list[str]) -> list[str]:
    """Names of the base-model modules owning a parameter that ``selector`` picks (SWIFT's rule).

    Args:
        selector: a regex full-matched against parameter names, or substrings any of which a name contains.
    """
    names = []
    matcher = PatternMatcher(selector, "LongLoraConfig.embedder_and_normalizer") if isinstance(selector, str) else None
    for module_name, module in _base_modules(model):
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            picked = matcher.matches(full) if matcher is not None else any(s in full for s in selector)
            if picked and module_name:
                names.append(module_name)
                break
    return names


def _base_modules(model: nn.Module):
    """``(name, module)`` of the base model: a tuner layer or wrapper stands for the module it wraps."""
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrappers):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrappers.append(name + ".")
            module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
        yield name, module
