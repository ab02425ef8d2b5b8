"""One case per tuner (two where a second model exercises a different path): a model, inputs and a config.

The checks in this folder run on every case. A case states what its tuner is (in-place, weightless in eval
mode, one adapter per model...) and, for a check that truly does not apply, the reason it is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from peft import PeftConfig
from torch import nn

from peft_swift_ext import (
    TUNERS,
    AdapterConfig,
    LisaConfig,
    LlamaProConfig,
    LongLoraConfig,
    LoraPlusConfig,
    NEFTuneConfig,
    PromptConfig,
    ResTuningConfig,
    SCEditConfig,
    SideConfig,
)

from ..tiny_models import llama_deep_prompt, llama_inputs, main_output, tiny_llama
from .models import (
    MLP,
    ConvNet,
    ResidualStack,
    TokenMixer,
    features_input,
    image_input,
    seeded,
    token_input,
    tokens_features_input,
)

NO_MODULES_TO_SAVE = "{config} has no modules_to_save option"


@dataclass
class GenericCase:
    """One tuner on one model.

    Args:
        id: the test id, e.g. ``"adapter-mlp"``.
        tuner: the tuner's name in ``peft_swift_ext.TUNERS``.
        make_model: a fresh seeded model in eval mode (same weights on every call).
        make_inputs: the keyword inputs of one forward.
        make_config: a fresh config of the tuner.
        output: picks the compared tensor from the model's output.
        eval_effect: False for tuners that change nothing in eval mode (NEFTune's training-time noise).
        in_place: the tuner trains the base model's own weights (LISA): a trained adapter is made by a
            training step instead of random adapter weights, and the base outputs cannot come back after it.
        one_adapter: why a model holds only one adapter of this tuner, or None.
        keeps_base_dtype: why the adapter's weights keep the base model's dtype even when PEFT upcasts
            adapters (as PEFT's own LN tuning), or None.
        make_config_with_modules_to_save: a config that also lists ``modules_to_save``, where the config has
            that option.
        not_applicable: check name -> why it does not apply to this case (the check is skipped with it).
    """

    id: str
    tuner: str
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[], dict]
    make_config: Callable[[], PeftConfig]
    output: Callable[[object], object] = main_output
    eval_effect: bool = True
    in_place: bool = False
    one_adapter: str | None = None
    keeps_base_dtype: str | None = None
    make_config_with_modules_to_save: Callable[[], PeftConfig] | None = None
    not_applicable: dict[str, str] = field(default_factory=dict)

    @property
    def merge_refusal(self) -> str | None:
        """Why this tuner cannot merge (the merge checks are skipped with it), or None when it can."""
        if getattr(TUNERS[self.tuner].model_cls, "mergeable", True):
            return None
        return (
            f"{self.tuner} adapters change activations, not weights, so there is nothing to merge "
            "(the refusal is checked by test_merge_is_refused_before_anything_changes)"
        )

    @property
    def weightless(self) -> bool:
        """Whether the tuner adds no trainable tensor of its own (NEFTune)."""
        return self.tuner == "neftune"


LLAMA_LAYERS = r"model\.layers\.\d+"
ONE_LISA = "LISA trains the base model's own weights, so a model takes one LISA adapter"
LISA_DTYPE = "LISA's adapter tensors are the base model's own weights: their dtype is the base's"
LLAMAPRO_DTYPE = "LLaMA-PRO's new blocks are copies of decoder layers and keep the base dtype, as PEFT's LN tuning"

CASES = [
    GenericCase(
        "adapter-mlp",
        "adapter",
        seeded(MLP),
        features_input,
        lambda: AdapterConfig(dim=16, target_modules=["lin0", "lin1"], adapter_length=4),
    ),
    GenericCase(
        "adapter-llama",
        "adapter",
        tiny_llama,
        llama_inputs,
        lambda: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
    ),
    GenericCase(
        "prompt-mixer",
        "prompt",
        seeded(TokenMixer),
        token_input,
        lambda: PromptConfig(
            dim=16, target_modules=r"layers\.\d+", embedding_pos=0, prompt_length=3, extract_embedding=True
        ),
    ),
    GenericCase(
        "side-mlp",
        "side",
        seeded(MLP),
        features_input,
        lambda: SideConfig(dim=16, target_modules=["lin1", "lin2"], side_module_name="mlp"),
    ),
    GenericCase(
        "side-convnet-root",
        "side",
        seeded(ConvNet),
        image_input,
        # the model itself is the target: its logits are blended with a small CNN's on the image
        lambda: SideConfig(dim=2, target_modules="", side_module_name="fcn4"),
        not_applicable={"test_mixed_enabled_state_warns_and_ends_enabled": "the only Side layer is on the root"},
    ),
    GenericCase(
        "restuning-stack",
        "restuning",
        seeded(ResidualStack),
        tokens_features_input,
        lambda: ResTuningConfig(
            dims=16, root_modules=r"blocks\.0", stem_modules=r"blocks\.\d+", target_modules="norm"
        ),
        not_applicable={"test_mixed_enabled_state_warns_and_ends_enabled": "Res-Tuning puts one layer per adapter"},
    ),
    GenericCase(
        "scedit-convnet",
        "scedit",
        seeded(ConvNet),
        image_input,
        lambda: SCEditConfig(dims=8, target_modules=["conv0", "conv1"], tuner_mode="encoder"),
    ),
    GenericCase(
        "llamapro-llama",
        "llamapro",
        tiny_llama,
        llama_inputs,
        lambda: LlamaProConfig(num_new_blocks=2),
        keeps_base_dtype=LLAMAPRO_DTYPE,
    ),
    GenericCase(
        "longlora-llama",
        "longlora",
        tiny_llama,
        llama_inputs,
        lambda: LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        make_config_with_modules_to_save=lambda: LongLoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"]
        ),
    ),
    GenericCase(
        "loraplus-mlp",
        "loraplus",
        seeded(MLP),
        features_input,
        lambda: LoraPlusConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False),
        make_config_with_modules_to_save=lambda: LoraPlusConfig(
            r=4, target_modules=["lin0"], init_lora_weights=False, modules_to_save=["head"]
        ),
    ),
    GenericCase(
        "neftune-mixer",
        "neftune",
        seeded(TokenMixer),
        token_input,
        lambda: NEFTuneConfig(noise_alpha=5.0, target_modules=["embed"]),
        eval_effect=False,
        not_applicable={
            "test_mixed_enabled_state_warns_and_ends_enabled": "NEFTune wraps one embedding module",
        },
    ),
    GenericCase(
        "lisa-llama",
        "lisa",
        partial(tiny_llama, num_layers=2),
        llama_inputs,
        lambda: LisaConfig(n_layers=1),
        in_place=True,
        one_adapter=ONE_LISA,
        keeps_base_dtype=LISA_DTYPE,
        not_applicable={
            "test_mixed_enabled_state_warns_and_ends_enabled": "LISA has one bookkeeping layer per model",
        },
    ),
]


# The checks that need a decoder's API (generate, inputs_embeds, gradient checkpointing) run on the Llama cases and on
# these decoder variants of tuners whose main case is a toy model.
DECODER_CASES = [case for case in CASES if case.id.endswith("-llama")] + [
    GenericCase(
        "prompt-llama",
        "prompt",
        tiny_llama,
        llama_inputs,
        lambda: llama_deep_prompt(),
    ),
    GenericCase("neftune-llama", "neftune", tiny_llama, llama_inputs, NEFTuneConfig, eval_effect=False),
]
