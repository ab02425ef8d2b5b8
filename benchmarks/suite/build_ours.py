"""Our side: every tuner through PEFT's ``get_peft_model`` (entry ``peft``) or ``Swift.prepare_model`` (``swift``)."""

from __future__ import annotations

import importlib.metadata

from peft import AdaLoraConfig, FourierFTConfig, LoraConfig, PeftModel, get_peft_model

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
    Swift,
)
from peft_swift_ext.tuners.scedit.model import unet_skip_channels

from . import models

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def config(tuner: str, family: str, size: dict, model):
    """The configurations of tests/contract/cases, scaled to the model's width."""
    h = size.get("hidden")
    if tuner == "lora":
        return LoraConfig(**LORA)
    if tuner == "loraplus":
        return LoraPlusConfig(**LORA, loraplus_lr_ratio=16.0)
    if tuner == "dora":
        return LoraConfig(**LORA, use_dora=True)
    if tuner == "adalora":
        return AdaLoraConfig(target_r=4, init_r=8, total_step=1000, target_modules=["q_proj", "v_proj"])
    if tuner == "fourierft":
        return FourierFTConfig(n_frequency=4 * h, scaling=150.0, target_modules=["q_proj", "v_proj"])
    if tuner == "longlora":
        return LongLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if tuner == "llamapro":
        return LlamaProConfig(num_new_blocks=2)
    if tuner == "neftune":
        return NEFTuneConfig(noise_alpha=5.0)
    if tuner == "adapter":
        return AdapterConfig(dim=h, target_modules=["mlp"], hidden_pos=0, adapter_length=max(8, h // 8))
    if tuner == "prompt":
        return PromptConfig(dim=h, target_modules=r"encoder\.layer\.\d+", embedding_pos=0, prompt_length=8)
    if tuner == "side":
        return SideConfig(
            dim=h, target_modules="encoder", side_module_name="mlp", target_hidden_pos="last_hidden_state"
        )
    if tuner == "restuning":
        return ResTuningConfig(
            dims=h, root_modules=r"layers\.0", stem_modules=r"layers\.\d+", target_modules="layernorm",
            tuner_cfg="res_adapter",
        )  # fmt: skip
    if tuner == "scedit":
        names, dims = models.unet_skip_dims(size)
        # the suite's own skip widths must be the ones the UNet really has (ms-swift's side cannot ask us)
        assert unet_skip_channels(model) == dict(zip(names, dims)), unet_skip_channels(model)
        return SCEditConfig(dims=dims, target_modules=names)
    raise ValueError(tuner)


def apply(model, tuner: str, entry: str, family: str, size: dict):
    peft_config = config(tuner, family, size, model)
    if entry == "swift":
        return Swift.prepare_model(model, {"default": peft_config})
    return get_peft_model(model, peft_config)


def merge(model):
    return model.merge_and_unload()


def save(model, path: str) -> None:
    model.save_pretrained(path)


def load(base, path: str, entry: str):
    if entry == "swift":
        return Swift.from_pretrained(base, path)
    return PeftModel.from_pretrained(base, path)


def prewarm() -> None:
    """Import what the children use, so that each forked child starts with it loaded."""
    import diffusers  # noqa: F401
    from transformers import BertModel, LlamaForCausalLM, ViTModel  # noqa: F401


def versions() -> dict:
    names = ("torch", "transformers", "peft", "diffusers", "peft-swift-ext")
    return {name: importlib.metadata.version(name) for name in names}
