"""Adapter, Prompt and Side together with LoRA in one SwiftModel: each switches on and off alone."""

from __future__ import annotations

import torch
from peft import LoraConfig

from peft_swift_ext import AdapterConfig, PromptConfig, SideConfig, Swift

from ..helpers import randomize_adapter, run, state_hash
from ..tiny_models import bert_inputs, main_output, tiny_bert


def configs() -> dict:
    return {
        "prompt": PromptConfig(
            dim=32,
            target_modules=r"encoder\.layer\.\d+",
            embedding_pos=0,
            attention_mask_pos=1,
            prompt_length=3,
            extract_embedding=True,
        ),
        "adapter": AdapterConfig(dim=32, target_modules=r"encoder\.layer\.\d+\.output", adapter_length=8),
        "side": SideConfig(dim=32, target_modules=r"encoder\.layer\.\d+\.attention\.output", side_module_name="mlp"),
        "lora": LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False),
    }


def test_each_tuner_in_the_mix_equals_that_tuner_alone(tmp_path):
    mixed = Swift.prepare_model(tiny_bert(), configs()).eval()
    for seed, name in enumerate(mixed.adapters):
        randomize_adapter(mixed, name, seed=seed)
    mixed.save_pretrained(tmp_path)
    inputs = bert_inputs()
    everything = run(mixed, inputs, main_output)
    for name in configs():
        alone = Swift.from_pretrained(tiny_bert(), tmp_path, adapter_name=name).eval()
        mixed.set_active_adapters([name])
        torch.testing.assert_close(run(mixed, inputs, main_output), run(alone, inputs, main_output), atol=1e-5, rtol=0)
        assert (everything - run(alone, inputs, main_output)).abs().max() > 1e-3


def test_unloading_the_mix_restores_the_base_model_exactly():
    mixed = Swift.prepare_model(tiny_bert(), configs())
    base = mixed.unload()
    assert state_hash(base) == state_hash(tiny_bert())
    inputs = bert_inputs()
    torch.testing.assert_close(run(base, inputs, main_output), run(tiny_bert(), inputs, main_output), atol=0, rtol=0)
