from __future__ import annotations

from torch import nn

from ...core.paths import find_target_modules
from ...core.slots import ArgumentSlot
from ...core.tuner import SwiftBaseTuner
from .config import PromptConfig
from .layer import PromptLayer, PromptSettings


class PromptModel(SwiftBaseTuner):
    """Puts a :class:`PromptLayer` around every layer ``PromptConfig.target_modules`` selects.

    The first selected layer (in model order) adds the prompt tokens; deeper ones replace them; with
    ``extract_embedding`` the last one removes them from its output.
    """

    prefix = "prompt_"
    tuner_layer_cls = PromptLayer

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Wrap the targeted layers; a list ``dim`` must give one size per targeted layer, in model order.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            **kwargs (Any): passed to PEFT's ``BaseTuner.inject_adapter``.
        """
        config = self.peft_config[adapter_name]
        # A layer already wrapped by this tuner is listed twice (wrapper and its base_layer): count it once.
        targets = list(dict.fromkeys(_without_base_layer(name) for name in find_target_modules(model, config)))
        if isinstance(config.dim, list) and len(config.dim) != len(targets):
            raise ValueError(
                f"PromptConfig.dim lists {len(config.dim)} sizes but target_modules selects {len(targets)} layers"
            )
        self._targets = {**getattr(self, "_targets", {}), adapter_name: targets}
        super().inject_adapter(model, adapter_name, **kwargs)

    def _validate_target(self, module: nn.Module, name: str, config: PromptConfig) -> None:
        super()._validate_target(module, name, config)
        base = module.get_base_layer() if isinstance(module, PromptLayer) else module
        for field in ("embedding_pos", "attention_mask_pos", "position_embeddings_pos"):
            position = getattr(config, field)
            problem = None if position is None else ArgumentSlot.problem(base, position)
            if problem is not None:
                raise ValueError(f"PromptConfig.{field} does not fit {name}: {problem}")

    def _create_and_replace(
        self, peft_config: PromptConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ) -> None:
        targets = self._targets[adapter_name]
        index = targets.index(_without_base_layer(current_key))
        dim = peft_config.dim[index] if isinstance(peft_config.dim, list) else peft_config.dim
        settings = PromptSettings(
            concatenates=index == 0,
            extracts=peft_config.extract_embedding and index == len(targets) - 1,
            attach_front=peft_config.attach_front,
            embedding_pos=peft_config.embedding_pos,
            attention_mask_pos=peft_config.attention_mask_pos,
            position_embeddings_pos=peft_config.position_embeddings_pos,
            mask_value=peft_config.attention_mask_value,
        )
        self._update_or_wrap(
            target,
            parent,
            target_name,
            lambda module: PromptLayer(module, current_key),
            adapter_name,
            dim,
            peft_config.prompt_length,
            settings,
        )


def _without_base_layer(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base_layer")
