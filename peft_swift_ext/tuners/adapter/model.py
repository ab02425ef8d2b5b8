from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.tuner import SwiftBaseTuner
from .config import AdapterConfig
from .layer import AdapterLayer

# Modules whose output size is known without running them; others are checked on the first forward.
_OUTPUT_SIZE = {
    nn.Linear: lambda m: m.out_features,
    nn.Embedding: lambda m: m.embedding_dim,
    nn.LayerNorm: lambda m: m.normalized_shape[-1],
}


class AdapterModel(SwiftBaseTuner):
    """Puts an :class:`AdapterLayer` around every module ``AdapterConfig.target_modules`` selects."""

    prefix = "adapter_"
    tuner_layer_cls = AdapterLayer

    def _validate_target(self, module: nn.Module, name: str, config: AdapterConfig) -> None:
        super()._validate_target(module, name, config)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not callable(getattr(base, config.method_name, None)):
            raise ValueError(
                f"AdapterConfig.method_name={config.method_name!r}: {name} ({type(base).__name__}) has no such method"
            )
        size_of = _OUTPUT_SIZE.get(type(base))
        if config.method_name == "forward" and size_of is not None and size_of(base) != config.dim:
            raise ValueError(
                f"AdapterConfig.dim={config.dim} does not fit {name}: "
                f"{type(base).__name__} outputs size {size_of(base)}"
            )

    def _create_and_replace(
        self, peft_config: AdapterConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ) -> None:
        fields = ("dim", "adapter_length", "act_layer", "hidden_pos", "method_name")  # update_layer's options
        options = {name: getattr(peft_config, name) for name in fields}
        self._update_or_wrap(
            target, parent, target_name, lambda module: AdapterLayer(module, current_key), adapter_name, **options
        )
