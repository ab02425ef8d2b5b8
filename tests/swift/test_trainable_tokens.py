"""PEFT's trainable tokens (``LoraConfig(trainable_token_indices=...)``) under this package's live active-adapter
lists: in a SwiftModel, and in a LoRA+ PeftModel's ``adapters(...)`` scope, the same outputs as a plain PeftModel.

PEFT's trainable-tokens layer concatenates its merged adapters with the active-adapter list it is given; both live
lists (``core.scope.LiveAdapterList``) must support that as a plain list does.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from peft_swift_ext import LoraPlusConfig, Swift

from ..tiny_models import llama_inputs, tiny_llama


def _config() -> LoraConfig:
    return LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, trainable_token_indices=[1, 2]
    )


def _with_token_rows_changed(model: torch.nn.Module) -> None:
    torch.manual_seed(7)
    for name, param in model.named_parameters():
        if "trainable_tokens_delta" in name:
            param.data.add_(torch.randn_like(param) * 0.5)


def test_forward_equals_the_peft_model_and_the_token_rows_train():
    base = tiny_llama()
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), _config())
    torch.manual_seed(0)
    swift_model = Swift.prepare_model(copy.deepcopy(base), {"default": _config()})
    adapter_keys = [key for key in peft_model.state_dict() if "lora_" in key or "trainable_tokens" in key]
    result = swift_model.load_state_dict({key: peft_model.state_dict()[key] for key in adapter_keys}, strict=False)
    assert adapter_keys and not result.unexpected_keys
    for model in (peft_model, swift_model):
        _with_token_rows_changed(model)
    inputs = llama_inputs()
    inputs["input_ids"][:, 0] = 1  # a row the adapter trains
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        got = swift_model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        plain = base(**inputs).logits
    assert not torch.allclose(got, plain)

    swift_model.train()
    swift_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    deltas = [p for n, p in swift_model.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas and all(p.grad is not None and p.grad.abs().sum() > 0 for p in deltas)


def test_a_lora_plus_scope_over_trainable_tokens_gives_the_unscoped_outputs():
    model = get_peft_model(
        tiny_llama(), LoraPlusConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    )
    _with_token_rows_changed(model)
    model.eval()
    inputs = llama_inputs()
    inputs["input_ids"][:, 0] = 1
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.adapters("default"):
            scoped = model(**inputs).logits
        with model.adapters():
            base_only = model(**inputs).logits
    torch.testing.assert_close(scoped, expected, rtol=0, atol=0)
    assert not torch.allclose(base_only, expected)
