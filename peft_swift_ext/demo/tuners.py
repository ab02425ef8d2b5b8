"""``--tuner`` specs: which tuners the demo adds to the causal LM, and with which settings.

A spec names one tuner or joins several with ``+`` (``lora+neftune``); each becomes an adapter of that name in
one :class:`~peft_swift_ext.SwiftModel`, built by :meth:`peft_swift_ext.Swift.prepare_model`. LoRA+ is spelled
``loraplus`` so that ``+`` always separates tuners.
"""

from __future__ import annotations

from collections.abc import Callable

from peft import LoraConfig, PeftConfig
from transformers import PretrainedConfig, PreTrainedModel

from ..core.registry import TUNERS
from ..swift import Swift, SwiftModel
from ..tuners import (
    AdapterConfig,
    LlamaProConfig,
    LongLoraConfig,
    LoraPlusConfig,
    NEFTuneConfig,
    PromptConfig,
    SideConfig,
)

DEFAULT_TUNER = "loraplus"
# Tuners that change training but hold no weights, so they cannot be fine-tuned alone.
WEIGHTLESS_TUNERS = {"neftune"}
_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_options() -> dict:
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(_LINEAR_LAYERS)}


#: tuner name -> config for a Llama-style causal LM, given the model's config. Settings are small and
#: demo-sized; every entry is exercised by tests/demo on a tiny Llama.
TUNER_CONFIGS: dict[str, Callable[[PretrainedConfig], PeftConfig]] = {
    "lora": lambda config: LoraConfig(**_lora_options()),
    "dora": lambda config: LoraConfig(**_lora_options(), use_dora=True),
    "loraplus": lambda config: LoraPlusConfig(**_lora_options(), loraplus_lr_ratio=16.0),
    "neftune": lambda config: NEFTuneConfig(noise_alpha=5.0),
    "adapter": lambda config: AdapterConfig(dim=config.hidden_size, target_modules=["mlp"], adapter_length=32),
    "prompt": lambda config: PromptConfig(
        dim=config.hidden_size,
        target_modules=r"model\.layers\.\d+",
        embedding_pos=0,
        attention_mask_pos="attention_mask",
        position_embeddings_pos="position_embeddings",
        prompt_length=8,
        extract_embedding=True,
    ),
    "side": lambda config: SideConfig(dim=config.hidden_size, target_modules=["model.norm"], side_module_name="mlp"),
    "llamapro": lambda config: LlamaProConfig(num_new_blocks=2),
    # LongLoRA also trains the embeddings and norms in full (its default), hence a much larger adapter
    "longlora": lambda config: LongLoraConfig(**_lora_options()),
}


def parse_tuner_spec(spec: str) -> list[str]:
    """The tuner names of a spec such as ``"lora+neftune"``, checked.

    Raises ``ValueError`` naming the accepted tuners for an unknown, repeated or empty name.
    """
    names = [name.strip().lower() for name in spec.split("+")]
    known = ", ".join(TUNER_CONFIGS)
    for name in names:
        if name in TUNER_CONFIGS:
            continue
        if name in TUNERS:
            raise ValueError(f"tuner {name!r} does not apply to a causal language model; choose from: {known}")
        raise ValueError(f"unknown tuner {name!r} in --tuner {spec!r}; choose from: {known} (join several with '+')")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--tuner {spec!r} names {repeated} more than once")
    if set(names) <= WEIGHTLESS_TUNERS:
        raise ValueError(
            f"--tuner {spec!r} has no trainable weights; combine it with a tuner that has some, e.g. lora+{names[0]}"
        )
    return names


def build_tuned_model(model: PreTrainedModel, tuner_spec: str) -> SwiftModel:
    """Add the tuners of ``tuner_spec`` to ``model`` (in place) as adapters named after them.

    Args:
        model: a Llama-style causal LM.
        tuner_spec: tuner names joined by ``+``, e.g. ``"loraplus"`` or ``"lora+neftune"``.
    """
    configs = {name: TUNER_CONFIGS[name](model.config) for name in parse_tuner_spec(tuner_spec)}
    return Swift.prepare_model(model, configs)
