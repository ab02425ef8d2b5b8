"""ms-swift 4.6.0 Adapter checkpoints load through Swift.from_pretrained and give ms-swift's outputs."""

from __future__ import annotations

import torch

from peft_swift_ext import AdapterConfig, Swift

from ..swift_fixtures import FIXTURES, load_case, run_case


def test_adapter_on_bert_feed_forward_chunk_matches_ms_swift():
    case, base, io = load_case("bert_adapter")
    model = Swift.from_pretrained(base, FIXTURES / "bert_adapter" / "ckpt").eval()
    assert isinstance(model.peft_config["default"], AdapterConfig)
    assert model.peft_config["default"].method_name == "feed_forward_chunk"
    output = run_case(case, model, io)
    torch.testing.assert_close(output.last_hidden_state, io["output.last_hidden_state"], atol=1e-5, rtol=0)


def test_adapter_mixed_with_lora_on_llama_matches_ms_swift():
    case, base, io = load_case("llama_mixed")
    model = Swift.from_pretrained(base, FIXTURES / "llama_mixed" / "ckpt").eval()
    assert sorted(model.adapters) == ["adp_b", "lora_a"]
    output = run_case(case, model, io)
    torch.testing.assert_close(output.logits, io["output.logits"], atol=1e-5, rtol=0)


def test_adapter_checkpoint_resaved_by_us_reloads_to_the_same_outputs(tmp_path):
    case, base, io = load_case("bert_adapter")
    Swift.from_pretrained(base, FIXTURES / "bert_adapter" / "ckpt").save_pretrained(tmp_path)
    _, fresh, _ = load_case("bert_adapter")
    output = run_case(case, Swift.from_pretrained(fresh, tmp_path).eval(), io)
    torch.testing.assert_close(output.last_hidden_state, io["output.last_hidden_state"], atol=1e-5, rtol=0)
