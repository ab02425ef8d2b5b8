"""The tuners of the composition matrix, on tiny models, and the pairs that meet on one module or nested ones.

A :class:`Tuner` is one adapter configuration on one model with its reference maths (``references.py``). A
:class:`Pair` names two tuners whose targets are the same module or nested modules, and which one's maths applies
outside when both are active: ``"later"`` where they share a module (the adapter added later wraps the earlier
one), or the name of the tuner that is outside whatever the order (its target holds the other's, it reads
features of the other's target, or the other only swaps in a trained copy of a module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftConfig
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from peft_swift_ext import (
    AdapterConfig,
    LlamaProConfig,
    LongLoraConfig,
    LoraPlusConfig,
    NEFTuneConfig,
    PromptConfig,
    ResTuningConfig,
    SCEditConfig,
    SideConfig,
)

from ..tiny_models import (
    bert_inputs,
    llama_deep_prompt,
    llama_inputs,
    main_output,
    tiny_bert,
    tiny_llama,
    tiny_unet,
    tiny_vit,
    unet_inputs,
    vit_inputs,
)
from . import references as ref


@dataclass(frozen=True)
class Model:
    """A tiny model, the inputs of one forward (no attention mask: the prompt reference models unmasked calls)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    pick: Callable = main_output


MODELS = {
    "llama": Model(tiny_llama, lambda: {**llama_inputs(), "use_cache": False}),
    "bert": Model(tiny_bert, lambda: {"input_ids": bert_inputs()["input_ids"]}),
    "vit": Model(tiny_vit, vit_inputs),
    "unet": Model(tiny_unet, unet_inputs),
}


@dataclass(frozen=True)
class Tuner:
    """One adapter on one model: its name in the tests, its config and its reference maths.

    Args:
        name: the adapter name (unique across the matrix, so a pair of one type gets two names).
        model: a key of :data:`MODELS`.
        config: a fresh config on each call.
        reference: installs the adapter's maths as hooks (see ``references.py``).
        training: the tuner only acts in training mode (NEFTune): the pair runs in training mode.
    """

    name: str
    model: str
    config: Callable[[], PeftConfig]
    reference: ref.Install
    training: bool = False


def _layers(pattern: str, count: int = 2) -> list[str]:
    return [pattern.format(i) for i in range(count)]


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LINEAR_PATHS = [
    f"model.layers.{i}.{'self_attn' if name in LLAMA_LINEAR[:4] else 'mlp'}.{name}"
    for i in range(2)
    for name in LLAMA_LINEAR
]
O_PROJ = _layers("model.layers.{}.self_attn.o_proj")
O_PROJ_PATTERN = r"model\.layers\.\d+\.self_attn\.o_proj"
MLP = _layers("model.layers.{}.mlp")
LORA = {"r": 4, "lora_alpha": 8}  # scaling 2
PROMPT_LENGTH = 3


def _llama_block(model: nn.Module, index: int) -> nn.Module:
    return LlamaDecoderLayer(model.config, layer_idx=model.config.num_hidden_layers + index)


def _adapter(pattern: str, **options) -> Callable[[], AdapterConfig]:
    return lambda: AdapterConfig(dim=32, target_modules=pattern, adapter_length=8, **options)


TUNERS = {
    tuner.name: tuner
    for tuner in [
        # --- Llama --------------------------------------------------------------------------------------------
        Tuner(
            "all_lora",
            "llama",
            lambda: LoraConfig(target_modules=LLAMA_LINEAR, **LORA),
            ref.lora(LLAMA_LINEAR_PATHS, 2.0),
        ),
        Tuner("o_lora", "llama", lambda: LoraConfig(target_modules=["o_proj"], **LORA), ref.lora(O_PROJ, 2.0)),
        Tuner(
            "o_dora",
            "llama",
            lambda: LoraConfig(target_modules=["o_proj"], use_dora=True, **LORA),
            ref.dora(O_PROJ, 2.0),
        ),
        Tuner("o_loraplus", "llama", lambda: LoraPlusConfig(target_modules=["o_proj"], **LORA), ref.lora(O_PROJ, 2.0)),
        Tuner(
            "o_longlora",
            "llama",
            lambda: LongLoraConfig(target_modules=["o_proj"], embedder_and_normalizer=["embed", "norm"], **LORA),
            ref.lora(O_PROJ, 2.0, keep_modules=True),
        ),
        Tuner(
            "embed_lora",
            "llama",
            lambda: LoraConfig(target_modules=["embed_tokens"], **LORA),
            ref.lora(["model.embed_tokens"], 2.0),
        ),
        Tuner("o_adapter", "llama", _adapter(O_PROJ_PATTERN), ref.adapter(O_PROJ)),
        Tuner("mlp_adapter", "llama", _adapter(r"model\.layers\.\d+\.mlp"), ref.adapter(MLP)),
        Tuner(
            "down_adapter",
            "llama",
            _adapter(r"model\.layers\.\d+\.mlp\.down_proj"),
            ref.adapter(_layers("model.layers.{}.mlp.down_proj")),
        ),
        Tuner("layer_adapter", "llama", _adapter(r"model\.layers\.1"), ref.adapter(["model.layers.1"])),
        Tuner("embed_adapter", "llama", _adapter(r"model\.embed_tokens"), ref.adapter(["model.embed_tokens"])),
        Tuner(
            "o_side",
            "llama",
            lambda: SideConfig(dim=32, target_modules=O_PROJ_PATTERN, side_module_name="mlp"),
            ref.side(O_PROJ),
        ),
        Tuner(
            "mlp_side",
            "llama",
            lambda: SideConfig(dim=32, target_modules=r"model\.layers\.\d+\.mlp", side_module_name="mlp"),
            ref.side(MLP),
        ),
        Tuner(
            "mlp_scedit",
            "llama",
            lambda: SCEditConfig(dims=32, target_modules=r"model\.layers\.\d+\.mlp", tuner_mode="identity"),
            ref.scedit(MLP, [32, 32], "identity"),
        ),
        Tuner(
            "llama_prompt",
            "llama",
            lambda: llama_deep_prompt(PROMPT_LENGTH),
            ref.prompt(_layers("model.layers.{}"), PROMPT_LENGTH, extract=True, rotary=True),
        ),
        Tuner(
            "expand_llamapro",
            "llama",
            lambda: LlamaProConfig(num_new_blocks=1),
            ref.llamapro("model.layers.1", 1, _llama_block),
        ),
        Tuner(
            "embed_neftune",
            "llama",
            lambda: NEFTuneConfig(noise_alpha=5.0),
            ref.neftune("model.embed_tokens", 5.0),
            training=True,
        ),
        # --- BERT ---------------------------------------------------------------------------------------------
        Tuner(
            "ffc_adapter",
            "bert",
            _adapter(r"encoder\.layer\.\d+", method_name="feed_forward_chunk"),
            # feed_forward_chunk returns what the layer's `output` module returns
            ref.adapter(_layers("encoder.layer.{}"), hooked=lambda path: f"{path}.output"),
        ),
        Tuner(
            "out_adapter",
            "bert",
            _adapter(r"encoder\.layer\.\d+\.output"),
            ref.adapter(_layers("encoder.layer.{}.output")),
        ),
        Tuner(
            "out_lora",
            "bert",
            lambda: LoraConfig(target_modules=r"encoder\.layer\.\d+\.output\.dense", **LORA),
            ref.lora(_layers("encoder.layer.{}.output.dense"), 2.0),
        ),
        Tuner(
            "qv_lora",
            "bert",
            lambda: LoraConfig(target_modules=["query", "value"], **LORA),
            ref.lora([f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")], 2.0),
        ),
        Tuner(
            "attn_side",
            "bert",
            lambda: SideConfig(
                dim=32, target_modules=r"encoder\.layer\.\d+\.attention\.output", side_module_name="mlp"
            ),
            ref.side(_layers("encoder.layer.{}.attention.output")),
        ),
        Tuner(
            "bert_prompt",
            "bert",
            lambda: PromptConfig(
                dim=32,
                target_modules=r"encoder\.layer\.\d+",
                embedding_pos=0,
                attention_mask_pos=1,
                prompt_length=PROMPT_LENGTH,
                extract_embedding=True,
            ),
            ref.prompt(_layers("encoder.layer.{}"), PROMPT_LENGTH, extract=True),
        ),
        # --- ViT ----------------------------------------------------------------------------------------------
        Tuner(
            "ln_restuning",
            "vit",
            lambda: ResTuningConfig(
                dims=32,
                root_modules=r"layers\.0",
                stem_modules=r"layers\.\d+",
                target_modules=r"layernorm",
                target_modules_hook="input",
                tuner_cfg="res_adapter",
            ),
            ref.restuning("layers.0", _layers("layers.{}"), "layernorm"),
        ),
        Tuner(
            "l1_restuning",
            "vit",
            # the last layer is a stem and the target: its output is read, then replaced by the bypass
            lambda: ResTuningConfig(
                dims=32,
                root_modules=r"layers\.0",
                stem_modules=r"layers\.\d+",
                target_modules=r"layers\.1",
                target_modules_hook="output",
                tuner_cfg="res_adapter",
            ),
            ref.restuning("layers.0", _layers("layers.{}"), "layers.1", hook="output"),
        ),
        Tuner("vit_adapter", "vit", _adapter(r"layers\.\d+"), ref.adapter(_layers("layers.{}"))),
        Tuner("l1_adapter", "vit", _adapter(r"layers\.1"), ref.adapter(["layers.1"])),
        Tuner("ln_adapter", "vit", _adapter(r"layernorm"), ref.adapter(["layernorm"])),
        Tuner(
            "ln_side",
            "vit",
            lambda: SideConfig(dim=32, target_modules=r"layernorm", side_module_name="mlp"),
            ref.side(["layernorm"]),
        ),
        Tuner(
            "vit_lora",
            "vit",
            lambda: LoraConfig(target_modules=["q_proj", "v_proj"], **LORA),
            ref.lora([f"layers.{i}.attention.{m}" for i in range(2) for m in ("q_proj", "v_proj")], 2.0),
        ),
        # --- UNet ---------------------------------------------------------------------------------------------
        Tuner(
            "skip_scedit",
            "unet",
            # the skip connections into the up-block resnets carry 64, 32, 32 and 32 channels
            lambda: SCEditConfig(
                dims=[64, 32, 32, 32], target_modules=r"up_blocks\.\d+\.resnets\.\d+", tuner_mode="decoder"
            ),
            ref.scedit(
                [f"up_blocks.{b}.resnets.{r}" for b in range(2) for r in range(2)], [64, 32, 32, 32], "decoder"
            ),
        ),
        Tuner(
            "temb_scedit",
            "unet",
            lambda: SCEditConfig(
                dims=[64, 64], target_modules=r"up_blocks\.0\.resnets\.\d+\.time_emb_proj", tuner_mode="identity"
            ),
            ref.scedit(_layers("up_blocks.0.resnets.{}.time_emb_proj"), [64, 64], "identity"),
        ),
        Tuner(
            "temb_lora",
            "unet",
            lambda: LoraConfig(target_modules=r"up_blocks\.0\.resnets\.\d+\.time_emb_proj", **LORA),
            ref.lora(_layers("up_blocks.0.resnets.{}.time_emb_proj"), 2.0),
        ),
    ]
}


@dataclass(frozen=True)
class Pair:
    """Two tuners that meet on one module or on nested modules.

    Args:
        first, second: tuner names (the matrix adds them in both orders).
        outer: whose maths applies outside when both are active: ``"later"`` (the one added second: they share
            a module) or a tuner name (outside in either order).
    """

    first: str
    second: str
    outer: str

    @property
    def model(self) -> str:
        return TUNERS[self.first].model


PAIRS = [
    # Llama: PEFT's LoRA family with the wrapping tuners, on one module or around it
    Pair("all_lora", "mlp_adapter", outer="mlp_adapter"),
    Pair("o_lora", "o_adapter", outer="later"),
    Pair("o_dora", "o_adapter", outer="later"),
    Pair("o_lora", "o_dora", outer="later"),  # one LoRA layer: DoRA normalises what precedes it in activation order
    Pair("o_lora", "o_loraplus", outer="later"),  # LoRA+ is a type of its own but joins LoRA's layer
    Pair("o_longlora", "o_adapter", outer="later"),
    Pair("o_side", "o_lora", outer="later"),
    Pair("mlp_side", "mlp_adapter", outer="later"),
    Pair("mlp_scedit", "mlp_adapter", outer="later"),
    Pair("mlp_scedit", "all_lora", outer="mlp_scedit"),
    Pair("down_adapter", "mlp_adapter", outer="mlp_adapter"),  # one type, one target inside the other
    # Llama: decoder layers (Prompt, LLaMA-PRO) around what is inside them, and on one layer together
    Pair("mlp_adapter", "llama_prompt", outer="llama_prompt"),
    Pair("all_lora", "llama_prompt", outer="llama_prompt"),
    Pair("layer_adapter", "expand_llamapro", outer="later"),
    Pair("all_lora", "expand_llamapro", outer="expand_llamapro"),
    Pair("llama_prompt", "expand_llamapro", outer="later"),
    # Llama: the input embeddings (training mode: NEFTune's noise, seeded)
    Pair("embed_neftune", "embed_lora", outer="later"),
    Pair("embed_neftune", "embed_adapter", outer="later"),
    # LongLoRA's trained copy of the embeddings is the module NEFTune adds noise to, whatever the order
    Pair("embed_neftune", "o_longlora", outer="embed_neftune"),
    # BERT: a method adapter, prompts
    Pair("ffc_adapter", "bert_prompt", outer="later"),
    Pair("ffc_adapter", "out_adapter", outer="ffc_adapter"),
    Pair("ffc_adapter", "out_lora", outer="ffc_adapter"),
    Pair("bert_prompt", "attn_side", outer="bert_prompt"),
    Pair("bert_prompt", "out_adapter", outer="bert_prompt"),
    Pair("bert_prompt", "qv_lora", outer="bert_prompt"),
    # ViT: Res-Tuning reads its stems' outputs and replaces its target's input
    Pair("ln_restuning", "vit_adapter", outer="ln_restuning"),
    Pair("ln_restuning", "ln_adapter", outer="later"),
    Pair("ln_restuning", "ln_side", outer="later"),
    Pair("ln_restuning", "vit_lora", outer="ln_restuning"),
    Pair("l1_restuning", "l1_adapter", outer="later"),
    # UNet: SCEdit on the skip connections (decoder) and on a module output (identity)
    Pair("skip_scedit", "temb_lora", outer="skip_scedit"),
    Pair("temb_scedit", "temb_lora", outer="later"),
]

# Pairs PEFT itself can hold (one tuner type in one PeftModel).
PEFT_PAIRS = [
    Pair("down_adapter", "mlp_adapter", outer="mlp_adapter"),
    Pair("ffc_adapter", "out_adapter", outer="ffc_adapter"),
    Pair("o_lora", "o_dora", outer="later"),
]


def ordered(pairs: list[Pair]) -> list[tuple[Pair, tuple[str, str]]]:
    """Every pair in both orders of adding: ``(pair, (added first, added second))``."""
    return [(pair, order) for pair in pairs for order in ((pair.first, pair.second), (pair.second, pair.first))]


def outer_of(pair: Pair, order: tuple[str, str]) -> str:
    """The tuner whose maths applies outside in this order."""
    return order[1] if pair.outer == "later" else pair.outer


def seeded(function: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``function`` with the global generator seeded (NEFTune draws its noise there)."""
    torch.manual_seed(1234)
    return function()
