"""LLaMA-PRO as a PEFT tuner: new blocks per adapter, switchable, with their own KV-cache slots."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.decoder_layers import find_decoder_layers
from ...core.layer import SwiftTunerLayer
from ...core.paths import parent_of
from ...core.tuner import SwiftBaseTuner
from .config import LlamaProConfig
from .layer import LlamaProLayer, output_projection_names, set_layer_index


class LlamaProModel(SwiftBaseTuner):
    """Wraps the last decoder layer of each group in a :class:`LlamaProLayer` holding the new blocks.

    New blocks get KV-cache slots after the original layers (the original layers keep theirs), and the text
    config's ``num_hidden_layers`` / ``layer_types`` count those slots while any block exists, so ``generate()``
    sizes its cache right. Merging and unloading materialises the expanded ``nn.ModuleList`` in order,
    renumbers every layer and updates the config: the result is a plain transformers model.
    """

    prefix = "llamapro_"
    tuner_layer_cls = LlamaProLayer
    mergeable = True

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: LlamaProConfig) -> list[str]:
        """The decoder layers that end a group (new blocks follow them); every layer to copy is checked first.

        Also records the model config's original ``num_hidden_layers`` / ``layer_types`` so that unloading
        restores them.
        """
        path, layers = find_layer_list(model, config)
        plan = expansion_plan(len(layers), config)
        for index in plan:
            check_expandable(layers[index], f"{path}.{index}", config)
            check_no_tokens_passed_on(layers[index], f"{path}.{index}")
        if not hasattr(self, "_original_text_config"):
            text_config = _text_config(model)
            self._layers_path = path
            self._original_text_config = {
                "num_hidden_layers": getattr(text_config, "num_hidden_layers", None),
                "layer_types": list(getattr(text_config, "layer_types", None) or []) or None,
            }
        elif path != self._layers_path:
            raise ValueError(
                f"LlamaProConfig.layers_path={path!r} differs from the list earlier adapters expanded "
                f"({self._layers_path!r})"
            )
        self._blocks_after = {f"{path}.{index}": count for index, count in plan.items()}
        return list(self._blocks_after)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        count = self._blocks_after[current_key]
        self._update_or_wrap(
            target, parent, target_name, LlamaProLayer, adapter_name, count, config.output_projections
        )

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        self._renumber_blocks(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT upcasts half-precision adapter weights to float32; new blocks are whole decoder layers that take the
        # base model's hidden states, masks and cache, and become ordinary layers on merge, so they keep its dtype.
        return None

    def _renumber_blocks(self, model: nn.Module) -> None:
        """Give every new block a KV-cache slot after the original layers and make the config count them."""
        layers = model.get_submodule(self._layers_path)
        origins = list(range(len(layers)))  # the original layer each KV-cache slot belongs to
        for index, layer in enumerate(layers):
            if isinstance(layer, LlamaProLayer):
                for blocks in layer.llamapro_blocks.values():
                    for block in blocks:
                        set_layer_index(block, len(origins))
                        origins.append(index)
        if len(origins) == len(layers):
            self._restore_text_config(model)
        else:
            self._count_layers(model, origins)

    def _count_layers(self, model: nn.Module, origins: list[int]) -> None:
        """Make the text config count one layer per entry of ``origins``, each of its original layer's type."""
        text_config = _text_config(model)
        text_config.num_hidden_layers = len(origins)
        original_types = self._original_text_config["layer_types"]
        if original_types:
            text_config.layer_types = [original_types[index] for index in origins]

    def _restore_text_config(self, model: nn.Module) -> None:
        text_config = _text_config(model)
        for key, value in self._original_text_config.items():
            if value is not None:
                setattr(text_config, key, list(value) if isinstance(value, list) else value)

    # --- hooks SwiftModel calls, and PEFT's own removal paths ------------------------------------------------------

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Called after the adapter's blocks were deleted from the layers: compact the cache slots and config.

        Args:
            adapter_name: the adapter that was deleted (every remaining block is renumbered).
        """
        self._renumber_blocks(self.model)

    def finalize_unload(self, merged: bool) -> None:
        """Before the wrappers go: with ``merged`` make the merged blocks ordinary layers, else restore the model."""
        layers = self.model.get_submodule(self._layers_path)
        if not merged:
            for index, layer in enumerate(layers):
                if isinstance(layer, LlamaProLayer):
                    layers[index] = layer.base_layer
            self._restore_text_config(self.model)
            return
        expanded, origins = [], []
        for index, layer in enumerate(layers):
            if isinstance(layer, LlamaProLayer):
                blocks = [block for name in layer.merged_adapters for block in layer.llamapro_blocks[name]]
                expanded += [layer.base_layer, *blocks]
            else:
                expanded.append(layer)
            origins += [index] * (len(expanded) - len(origins))
        for index, layer in enumerate(expanded):
            set_layer_index(layer, index)
        parent, attr = parent_of(self.model, self._layers_path)
        setattr(parent, attr, nn.ModuleList(expanded))
        self._count_layers(self.model, origins)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter as PEFT does, then tidy what the tuner changed outside its layers.

        Args:
            adapter_name: the adapter to delete.
        """
        super().delete_adapter(adapter_name)
        self.remove_adapter_structures(adapter_name)


def find_layer_list(model: nn.Module, config: LlamaProConfig) -> tuple[str, nn.ModuleList]:
    """``(path, list)`` of the decoder layers: ``config.layers_path``, or the largest list of repeated blocks
    whose layers hold ``config.output_projections``.

    Args:
        model: the model to expand.
        config: the adapter's config.
    """
    return find_decoder_layers(
        model,
        config.layers_path,
        accept=lambda layers: bool(output_projection_names(layers[-1], config.output_projections)),
        field="LlamaProConfig.layers_path",
        accept_description=f"whose layers hold LlamaProConfig.output_projections={config.output_projections}",
    )


def expansion_plan(num_layers: int, config: LlamaProConfig) -> dict[int, int]:
    """Index of each group's last layer -> how many blocks follow it."""
    if num_layers % config.num_new_blocks:
        raise ValueError(
            f"LlamaProConfig.num_new_blocks={config.num_new_blocks} must divide the number of decoder layers "
            f"({num_layers})"
        )
    group_size = num_layers // config.num_groups
    per_group = config.num_new_blocks // config.num_groups
    return {(group + 1) * group_size - 1: per_group for group in range(config.num_groups)}


def check_expandable(layer: nn.Module, name: str, config: LlamaProConfig) -> None:
    """Raise before any change if ``layer`` cannot be copied into an identity block."""
    base = layer.base_layer if isinstance(layer, LlamaProLayer) else layer
    if not output_projection_names(base, config.output_projections):
        raise ValueError(
            f"LlamaProConfig.output_projections={config.output_projections} names no module of '{name}' "
            f"({type(base).__name__}); a new block would not start as the identity"
        )
    merged = [type(m).__name__ for m in base.modules() if isinstance(m, BaseTunerLayer) and m.merged]
    if merged:
        raise ValueError(f"'{name}' holds merged adapters ({', '.join(merged)}); unmerge them before adding LLaMA-PRO")


def check_no_tokens_passed_on(layer: nn.Module, name: str) -> None:
    """Raise before any change if the new blocks would wrap a layer whose output carries tokens (deep prompts)
    that the arguments the blocks get (the model's masks and positions) do not cover.

    Added first, LLaMA-PRO works with prompts: a Prompt adapter added later wraps the layer with its blocks, so
    they get its extended masks and positions too.
    """
    module = layer
    while isinstance(module, BaseTunerLayer) and not isinstance(module, LlamaProLayer):
        passing = module.adapters_passing_tokens_on() if isinstance(module, SwiftTunerLayer) else []
        if passing:
            raise ValueError(
                f"LLaMA-PRO cannot add blocks after '{name}': its {module.tuner_name} adapter(s) {passing} pass "
                "their tokens on to the next layer, and the new blocks would get them without the masks and "
                f"positions that cover them; add the LLaMA-PRO adapter before {passing} (the {module.tuner_name} "
                "layer then wraps the new blocks too)"
            )
        module = module.base_layer


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return _NoConfig()
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


class _NoConfig:
    """Stands in for the config of a model that has none (plain nn.Module stacks), absorbing updates."""
