"""The dtype of the adapters a SwiftModel creates on a half-precision base: PEFT's ``autocast_adapter_dtype``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from peft_swift_ext import AdapterConfig, Swift
from peft_swift_ext.core.keys import adapter_tensors

from ..tiny_models import llama_inputs, main_output, tiny_llama


def dtypes(model, adapter_name: str) -> set[torch.dtype]:
    return {t.dtype for _, t in adapter_tensors(model.model, adapter_name).values() if t.is_floating_point()}


def configs() -> dict:
    return {
        "adapter": AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
        "lora": LoraConfig(r=2, target_modules=["q_proj"]),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_adapters_of_every_type_train_in_float32_by_default(dtype):
    model = Swift.prepare_model(tiny_llama().to(dtype), configs()).eval()
    assert dtypes(model, "adapter") == {torch.float32}
    assert dtypes(model, "lora") == {torch.float32}
    with torch.no_grad():
        assert main_output(model(**llama_inputs())).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype_for_every_type(dtype):
    model = Swift.prepare_model(tiny_llama().to(dtype), configs(), autocast_adapter_dtype=False)
    assert dtypes(model, "adapter") == {dtype}
    assert dtypes(model, "lora") == {dtype}
