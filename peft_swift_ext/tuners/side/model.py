from __future__ import annotations

import torch
from peft import PeftConfig
from torch import nn

from ..base import SwiftBaseTuner, follow_parent_mode, rename_swift_keys
from ..positions import ArgumentSlot
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
        base = module.get_base_layer() if isinstance(module, SideLayer) else module
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
        options = {
            "dim": peft_config.dim,
            "side_module_name": peft_config.side_module_name,
            "source_hidden_pos": peft_config.source_hidden_pos,
            "target_hidden_pos": peft_config.target_hidden_pos,
        }
        if target_name == "":
            self._attach_to_root(target, adapter_name, options)
            return
        self._update_or_wrap(
            target, parent, target_name, lambda module: SideLayer(module, current_key), adapter_name, **options
        )

    @staticmethod
    def _attach_to_root(root: nn.Module, adapter_name: str, options: dict) -> None:
        # A module cannot be replaced inside itself: the layer lives in the model and its forward is routed there.
        existing = getattr(root, ROOT_SIDE_ATTR, None)
        layer = existing if isinstance(existing, SideLayer) else SideLayer(RootCall(root), type(root).__name__)
        layer.update_layer(adapter_name, **options)
        if layer is not existing:
            attach_to_root(root, layer)
        follow_parent_mode(layer, root)

    @classmethod
    def from_swift_state_dict(
        cls,
        weights: dict[str, torch.Tensor],
        adapter_name: str,
        config: PeftConfig | None = None,
        model: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rewrite ms-swift keys (``<path>.side_<name>.side_net.*``, ``.alpha``) into ours.

        Ours are ``<path>.side_net.<name>.*`` and ``<path>.side_alpha.<name>``.

        Args:
            weights: the tensors of an ms-swift Side checkpoint.
            adapter_name: the adapter name it was saved under.
            config: the adapter's config (not needed for this renaming).
            model: the model it will be loaded into (not needed for this renaming).
        """
        containers = {"side_net": "side_net", "alpha": "side_alpha"}
        renamed = rename_swift_keys(weights, f"side_{adapter_name}", adapter_name, containers)
        # ms-swift keeps a root-model side network at the top level (an empty module path); ours is a sub-module.
        on_root = tuple(f"{attr}.{adapter_name}" for attr in SideLayer.adapter_layer_names)
        return {f"{ROOT_SIDE_ATTR}.{k}" if k.startswith(on_root) else k: v for k, v in renamed.items()}
