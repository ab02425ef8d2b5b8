"""The unsloth backend end to end; runs only where unsloth is installed (its own tox env), since importing
unsloth patches transformers for the whole process."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from technique_helpers import random_batch, save_tiny_llama_with_tokenizer, tiny_llama

pytest.importorskip("unsloth")

from peft_swift_ext.techniques.unsloth import load_with_unsloth  # noqa: E402

CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def unsloth_lora(tmp_path):
    save_tiny_llama_with_tokenizer(tmp_path / "base")
    model, tokenizer = load_with_unsloth(str(tmp_path / "base"), CONFIG, max_seq_length=64, dtype=torch.float32)
    return model, tokenizer


def test_result_is_a_peft_model_equal_to_plain_peft_with_the_same_weights(unsloth_lora):
    model, tokenizer = unsloth_lora
    assert isinstance(model, PeftModel) and tokenizer is not None
    reference = get_peft_model(tiny_llama(), CONFIG)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, atol=1e-5, rtol=0)


def test_saved_adapter_loads_into_plain_transformers(unsloth_lora, tmp_path):
    model, _ = unsloth_lora
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, model(**batch).loss, atol=1e-5, rtol=0)
