"""Optional unsloth backend: load a causal LM through unsloth and add LoRA through it (the result is a regular
`peft.PeftModel`). Install caveats and what runs on CPU: docs/techniques/unsloth.md.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from peft import LoraConfig

# LoraConfig fields that unsloth's get_peft_model accepts under the same name.
_LORA_FIELDS = (
    "r", "target_modules", "lora_alpha", "lora_dropout", "bias", "layers_to_transform", "layers_pattern",
    "use_rslora", "modules_to_save", "init_lora_weights",
)  # fmt: skip


def lora_config_to_unsloth_kwargs(config: LoraConfig) -> dict:
    """unsloth `get_peft_model` keyword arguments equivalent to a PEFT `LoraConfig`; refuses what unsloth lacks.

    Args:
        config: the PEFT LoRA config.
    """
    if config.use_dora:
        raise ValueError("unsloth's get_peft_model does not support DoRA (use_dora=True)")
    kwargs = {name: getattr(config, name) for name in _LORA_FIELDS}
    if isinstance(kwargs["target_modules"], set):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    return kwargs


def load_with_unsloth(
    model_name_or_path: str,
    lora_config: LoraConfig | None = None,
    max_seq_length: int = 2048,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    seed: int = 0,
    **from_pretrained_kwargs,
) -> tuple[torch.nn.Module, Any]:
    """Load `model_name_or_path` with `unsloth.FastLanguageModel` and, if given, add LoRA through unsloth.

    Args:
        model_name_or_path: a local directory or hub name, as for `from_pretrained`.
        lora_config: the adapter to add; None returns the plain unsloth model (e.g. for full fine-tuning).
        max_seq_length: longest sequence unsloth prepares its kernels and RoPE cache for.
        dtype: weight dtype; None lets unsloth choose.
        load_in_4bit: load 4-bit bitsandbytes weights (QLoRA); needs a CUDA GPU.
        seed: seed of the adapter initialisation (unsloth's `random_state`).
        **from_pretrained_kwargs (Any): passed on to `FastLanguageModel.from_pretrained`.

    Returns:
        `(model, tokenizer)`; `model` is a `peft.PeftModel` when `lora_config` is given.
    """
    lora_kwargs = lora_config_to_unsloth_kwargs(lora_config) if lora_config is not None else None
    try:
        fast_model = importlib.import_module("unsloth").FastLanguageModel
    except ImportError as err:
        raise ImportError(
            "load_with_unsloth needs unsloth: pip install 'peft-swift-ext[unsloth]' on a CUDA machine, or on CPU "
            "`pip install --no-deps unsloth unsloth_zoo` next to the pinned torch (see docs/techniques/unsloth.md)"
        ) from err
    model, tokenizer = fast_model.from_pretrained(
        model_name_or_path,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        **from_pretrained_kwargs,
    )
    if lora_kwargs is not None:
        model = fast_model.get_peft_model(
            model, random_state=seed, max_seq_length=max_seq_length, use_gradient_checkpointing=False, **lora_kwargs
        )
    return model, tokenizer
