"""NEFTune as a PEFT tuner: noise on the input embeddings, and the base weights that train beside it.

PEFT's ``save_pretrained`` writes only a tuner's tensors, so at save time each trainable base parameter is
registered, under the same tensor, as ``neftune_<its path with '-' for '.'>`` in a ``ParameterDict`` keyed by every
NEFTune adapter name; loading copies them back into the base tensors (see docs/tuners/neftune.md).
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.paths import adapter_parameter_ids, canonical_path
from ...core.tuner import SwiftBaseTuner
from ...core.unwrap import get_input_embeddings
from .config import NEFTuneConfig
from .layer import NEFTuneEmbedding

ALIAS_PREFIX = "neftune_"


class NEFTuneModel(SwiftBaseTuner):
    """Wraps the input embeddings in a :class:`NEFTuneEmbedding`; merging only removes the (training-time) noise.

    When base weights train beside it (full fine-tuning with noise), its checkpoints carry them (see the module
    docstring).
    """

    prefix = ALIAS_PREFIX
    tuner_layer_cls = NEFTuneEmbedding
    mergeable = True
    has_weights = False

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: NEFTuneConfig) -> list[str]:
        # target_modules defaults to the model's input embeddings; the resolved name is stored in the config.
        if config.target_modules is None:
            config.target_modules = [_input_embeddings_name(model)]
        return super()._plan_targets(model, adapter_name, config)

    def _validate_target(self, module: nn.Module, name: str, config: NEFTuneConfig) -> None:
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        # LongLoRA (and PEFT's modules_to_save) train a copy of the embeddings inside a wrapper: noise its output.
        base = getattr(base, "original_module", base)
        if not isinstance(base, nn.Embedding):
            raise ValueError(
                f"NEFTuneConfig.target_modules selects '{name}', a {type(base).__name__}; NEFTune adds noise to "
                "embedding layers (nn.Embedding) only"
            )

    def _create_and_replace(
        self,
        config: NEFTuneConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        **kwargs,
    ) -> None:
        self._update_or_wrap(target, parent, target_name, NEFTuneEmbedding, adapter_name, config.noise_alpha)

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        if "_saved_base" in self.__dict__:
            return
        # alias name -> the base parameter it stands for, for every base weight a checkpoint holds
        self._saved_base: dict[str, nn.Parameter] = {}
        self.register_state_dict_pre_hook(_alias_trainable_base_weights)
        self.register_load_state_dict_pre_hook(_load_base_weights)

    # --- the base weights a checkpoint carries ----------------------------------------------------------------

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The base model's own parameters (no adapter's), by alias name (``neftune_`` + path with ``-``)."""
        adapters = adapter_parameter_ids(self.model)
        return {
            ALIAS_PREFIX + canonical_path(name).replace(".", "-"): param
            for name, param in self.model.named_parameters()
            if id(param) not in adapters
        }

    def saved_base_parameters(self) -> dict[str, nn.Parameter]:
        """The base parameters the next checkpoint carries: trainable now, or saved or loaded before."""
        trainable = {alias: p for alias, p in self.base_parameters().items() if p.requires_grad}
        self._saved_base.update(trainable)
        return dict(self._saved_base)

    def _sync_aliases(self) -> None:
        """Register every saved base parameter as an alias entry of each NEFTune adapter (PEFT saves those)."""
        names = list(self.peft_config)
        for alias, param in self.saved_base_parameters().items():
            container = self._modules.get(alias)
            if not isinstance(container, nn.ParameterDict) or set(container.keys()) != set(names):
                self._modules[alias] = nn.ParameterDict({name: param for name in names})

    def _drop_aliases(self) -> None:
        for alias in list(self._saved_base):
            self._modules.pop(alias, None)
        self._saved_base.clear()

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Drop the base-weight aliases once no NEFTune adapter is left (SwiftModel's deletion).

        Args:
            adapter_name: the adapter that was just deleted.
        """
        if not [name for name in self.peft_config if name != adapter_name]:
            self._drop_aliases()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; its entries in the base-weight aliases go with it.

        Args:
            adapter_name: the NEFTune adapter to delete.
        """
        super().delete_adapter(adapter_name)
        for alias in self._saved_base:
            container = self._modules.get(alias)
            if isinstance(container, nn.ParameterDict) and adapter_name in container:
                del container[adapter_name]
        self.remove_adapter_structures(adapter_name)

    def finalize_unload(self, merged: bool) -> None:
        """Drop the base-weight aliases: the trained weights stay in the base model that unloading returns.

        Args:
            merged: whether the adapters were merged first.
        """
        super().finalize_unload(merged)
        self._drop_aliases()


def _alias_trainable_base_weights(module: NEFTuneModel, prefix: str, keep_vars: bool) -> None:
    """Before the tuner's state dict is taken (PEFT's ``save_pretrained``): alias the base weights it must hold."""
    module._sync_aliases()


def _load_base_weights(module: NEFTuneModel, state_dict, prefix: str, metadata, strict, missing, unexpected, errors):
    """Before a state dict loads into the tuner: copy every base weight it holds into the base parameter.

    PEFT names a key ``<alias>.<adapter>`` or leaves it ``<alias>`` (peft >= 0.21 remaps only keys the model
    already has), so both forms are read. A loaded weight stays in later checkpoints; a key of no base parameter is
    left alone, for ``load_state_dict`` to report as unexpected.
    """
    params = module.base_parameters()
    loaded = {}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        alias = key[len(prefix) :].split(".", 1)[0]
        param = params.get(alias)
        if param is None:
            continue
        value = state_dict.pop(key)
        if tuple(value.shape) != tuple(param.shape):
            errors.append(
                f"size mismatch for the base weight {alias}: the checkpoint has {tuple(value.shape)}, the model "
                f"{tuple(param.shape)}"
            )
            continue
        loaded[alias] = (param, value)
    if errors:
        return
    with torch.no_grad():
        for param, value in loaded.values():
            param.copy_(value)
    module._saved_base.update({alias: param for alias, (param, _) in loaded.items()})
    module._sync_aliases()
    # the loaded aliases' entries are the parameters themselves now: nothing more to copy, nothing missing
    for alias, (param, _) in loaded.items():
        for name in module._modules[alias].keys():
            state_dict[f"{prefix}{alias}.{name}"] = param


def _input_embeddings_name(model: nn.Module) -> str:
    """The module path of ``model.get_input_embeddings()``, with a clear error when there is none."""
    embeddings = get_input_embeddings(model)
    for name, module in model.named_modules():
        if module is embeddings:
            return name
    raise ValueError(
        f"NEFTuneConfig.target_modules is None and {type(model).__name__} has no get_input_embeddings(); "
        "set target_modules to the name of the embedding module"
    )
