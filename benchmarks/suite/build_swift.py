"""ms-swift's side, run under its own virtual environment: imports only torch, transformers and swift.

The configurations mirror ``build_ours`` field by field in ms-swift's spelling (see
tests/fixtures/swift/NOTES.md): regexes where ms-swift full-matches, ``model_type`` for LLaMA-PRO.
"""

from __future__ import annotations

import importlib.metadata

from swift.tuners import (
    AdapterConfig,
    LLaMAProConfig,
    LongLoRAConfig,
    LoRAConfig,
    NEFTuneConfig,
    PromptConfig,
    ResTuningConfig,
    SCETuningConfig,
    SideConfig,
    Swift,
)

from . import models

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def config(tuner: str, family: str, size: dict):
    h = size.get("hidden")
    if tuner == "lora":
        return LoRAConfig(**LORA)
    if tuner == "loraplus":
        return LoRAConfig(**LORA, lorap_lr_ratio=16.0)
    if tuner == "dora":
        return LoRAConfig(**LORA, use_dora=True)
    if tuner == "longlora":
        # model_type=None: ms-swift's S²-attention patch crashes on transformers 5 (NOTES.md), so this is its
        # LoRA with trainable embeddings and norms, without the shifted short attention.
        return LongLoRAConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            embedder_and_normalizer=["embed", "norm"], model_type=None,
        )  # fmt: skip
    if tuner == "llamapro":
        return LLaMAProConfig(model_type="llama", num_new_blocks=2)
    if tuner == "neftune":
        return NEFTuneConfig(noise_alpha=5.0)
    if tuner == "adapter":
        return AdapterConfig(
            dim=h, target_modules=r"model\.layers\.\d+\.mlp", hidden_pos=0, adapter_length=max(8, h // 8),
            act_layer="gelu",
        )  # fmt: skip
    if tuner == "prompt":
        return PromptConfig(dim=h, target_modules=r".*layer\.\d+$", embedding_pos=0, prompt_length=8)
    if tuner == "side":
        return SideConfig(
            dim=h, target_modules="encoder", side_module_name="mlp", source_hidden_pos=0,
            target_hidden_pos="last_hidden_state",
        )  # fmt: skip
    if tuner == "restuning":
        return ResTuningConfig(
            dims=h, root_modules=r"layers\.0", stem_modules=r"layers\.\d+", target_modules="layernorm",
            target_modules_hook="input", tuner_cfg="res_adapter",
        )  # fmt: skip
    if tuner == "scedit":
        names, dims = models.unet_skip_dims(size)
        return SCETuningConfig(dims=dims, target_modules=names, tuner_mode="decoder")
    raise ValueError(f"ms-swift has no {tuner}")


def apply(model, tuner: str, entry: str, family: str, size: dict):
    model = Swift.prepare_model(model, {"default": config(tuner, family, size)})
    if tuner == "neftune":
        # ms-swift leaves every base weight trainable under NEFTune (it is meant for full fine-tuning); frozen
        # here so that both sides do the same work: noise on the embeddings and a backward through activations.
        model.requires_grad_(False)
    return model


def merge(model):
    return Swift.merge_and_unload(model)


def save(model, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True)


def load(base, path: str, entry: str):
    return Swift.from_pretrained(base, path)


def prewarm() -> None:
    import diffusers  # noqa: F401
    from transformers import BertModel, LlamaForCausalLM, ViTModel  # noqa: F401


def versions() -> dict:
    names = ("torch", "transformers", "peft", "diffusers", "ms-swift")
    return {name: importlib.metadata.version(name) for name in names}
