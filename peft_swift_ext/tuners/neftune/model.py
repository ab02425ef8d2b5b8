from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.tuner import SwiftBaseTuner
from .config import NEFTuneConfig
from .layer import NEFTuneEmbedding


class NEFTuneModel(SwiftBaseTuner):
    """Wraps the input embeddings in a :class:`NEFTuneEmbedding`; merging only removes the (training-time) noise."""

    prefix = "neftune_"
    tuner_layer_cls = NEFTuneEmbedding
    mergeable = True

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


def _input_embeddings_name(model: nn.Module) -> str:
    """The module path of ``model.get_input_embeddings()``, with a clear error when there is none."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    for name, module in model.named_modules():
        if embeddings is not None and module is embeddings:
            return name
    raise ValueError(
        f"NEFTuneConfig.target_modules is None and {type(model).__name__} has no get_input_embeddings(); "
        "set target_modules to the name of the embedding module"
    )
