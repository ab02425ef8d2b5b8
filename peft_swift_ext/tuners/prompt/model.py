from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.paths import canonical_path
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

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: PromptConfig) -> list[str]:
        # A list dim gives one size per targeted layer, in model order; the first layer adds the tokens.
        targets = super()._plan_targets(model, adapter_name, config)
        if isinstance(config.dim, list) and len(config.dim) != len(targets):
            raise ValueError(
                f"PromptConfig.dim lists {len(config.dim)} sizes but target_modules selects {len(targets)} layers"
            )
        self._targets = {**getattr(self, "_targets", {}), adapter_name: [canonical_path(t) for t in targets]}
        return targets

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        # the planned target list is only needed while the adapter is injected
        self._targets.pop(adapter_name, None)

    def _validate_target(self, module: nn.Module, name: str, config: PromptConfig) -> None:
        super()._validate_target(module, name, config)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        for field in ("embedding_pos", "attention_mask_pos", "position_embeddings_pos"):
            position = getattr(config, field)
            problem = None if position is None else ArgumentSlot.problem(base, position)
            if problem is not None:
                raise ValueError(f"PromptConfig.{field} does not fit {name}: {problem}")
        if not config.attach_front and any(getattr(m, "is_causal", False) is True for m in base.modules()):
            # causal attention: no token ever sees tokens placed after it, so the prompts would never train
            raise ValueError(
                f"PromptConfig.attach_front=False does not fit {name}: its attention is causal, so no token would "
                "see prompt tokens placed after the sequence; use attach_front=True"
            )

    def _create_and_replace(
        self, peft_config: PromptConfig, adapter_name, target, target_name, parent, current_key, **kwargs
    ) -> None:
        targets = self._targets[adapter_name]
        index = targets.index(current_key)
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
