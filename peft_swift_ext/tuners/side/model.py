from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.layer import follow_parent_mode
from ...core.slots import ArgumentSlot
from ...core.tuner import SwiftBaseTuner
from .config import SideConfig
from .layer import ROOT_SIDE_ATTR, RootCall, SideLayer, attach_to_root

# Modules whose input and output sizes are known without running them; others are checked on the first forward.
_MLP_SIZES = {
    nn.Linear: lambda m: (m.in_features, m.out_features),
    nn.LayerNorm: lambda m: (m.normalized_shape[-1],) * 2,
}


class SideModel(SwiftBaseTuner):
    """Puts a :class:`SideLayer` around every module ``SideConfig.target_modules`` selects."""

    prefix = "side_"
    tuner_layer_cls = SideLayer
    # A side network on an image model's logits reads the image, which only the model itself receives.
    wraps_root = True

    def _validate_target(self, module: nn.Module, name: str, config: SideConfig) -> None:
        super()._validate_target(module, name, config)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        problem = ArgumentSlot.problem(base, config.source_hidden_pos)
        if problem is not None:
            raise ValueError(f"SideConfig.source_hidden_pos does not fit {name}: {problem}")
        sizes = _MLP_SIZES.get(type(base))
        if config.side_module_name == "mlp" and sizes is not None and sizes(base) != (config.dim, config.dim):
            raise ValueError(
                f"SideConfig.dim={config.dim} does not fit {name}: the mlp side network maps dim -> dim, but "
                f"{type(base).__name__} maps {sizes(base)[0]} -> {sizes(base)[1]}"
            )

    def _create_and_replace(
        self, peft_config: SideConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ) -> None:
        fields = ("dim", "side_module_name", "source_hidden_pos", "target_hidden_pos")
        options = {name: getattr(peft_config, name) for name in fields}
        if target_name == "":
            self._attach_to_root(target, adapter_name, options)
            return
        self._update_or_wrap(
            target, parent, target_name, lambda module: SideLayer(module, current_key), adapter_name, **options
        )

    def _attach_to_root(self, root: nn.Module, adapter_name: str, options: dict) -> None:
        # A module cannot be replaced inside itself: the layer lives in the model and its forward is routed there.
        existing = getattr(root, ROOT_SIDE_ATTR, None)
        layer = existing if isinstance(existing, SideLayer) else SideLayer(RootCall(root), type(root).__name__)
        layer.update_layer(adapter_name, **options)
        layer.scope_token = self.scope_token
        if layer is not existing:
            attach_to_root(root, layer)
        follow_parent_mode(layer, root)
