"""ms-swift 4.6.0 Prompt / VPT checkpoints load through Swift.from_pretrained and give ms-swift's outputs."""

from __future__ import annotations

import torch

from peft_swift_ext import PromptConfig, Swift

from ..swift_fixtures import FIXTURES, load_case, run_case


def test_deep_prompt_on_bert_matches_ms_swift():
    case, base, io = load_case("bert_prompt")
    model = Swift.from_pretrained(base, FIXTURES / "bert_prompt" / "ckpt").eval()
    assert isinstance(model.peft_config["default"], PromptConfig)
    output = run_case(case, model, io)
    # ms-swift keeps the prompt tokens in the output: 8 input positions + 4 prompts
    assert output.last_hidden_state.shape == (2, 12, 32)
    torch.testing.assert_close(output.last_hidden_state, io["output.last_hidden_state"], atol=1e-5, rtol=0)


def test_deep_vpt_on_vit_matches_ms_swift():
    case, base, io = load_case("vit_prompt")
    model = Swift.from_pretrained(base, FIXTURES / "vit_prompt" / "ckpt").eval()
    assert model.adapters == ["vpt"]
    captured = {}
    layernorm = model.base_model.vit.layernorm
    handle = layernorm.register_forward_hook(lambda module, args, out: captured.update(hidden=out))
    output = run_case(case, model, io)
    handle.remove()
    torch.testing.assert_close(output.logits, io["output.logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(captured["hidden"], io["output.last_hidden_state"], atol=1e-5, rtol=0)
