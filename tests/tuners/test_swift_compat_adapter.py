"""ms-swift 4.6.0 Adapter checkpoints load through Swift.from_pretrained and give ms-swift's outputs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_swift_ext import AdapterConfig, Swift

FIXTURES = Path(__file__).parents[1] / "fixtures" / "swift"


def load_case(name: str):
    """The fixture's base model (from its own weights), its recorded inputs/outputs and its description."""
    folder = FIXTURES / name
    if not (folder / "case.json").is_file():
        pytest.skip(f"ms-swift fixture {name} is missing")
    case = json.loads((folder / "case.json").read_text())
    module_name, _, class_name = case["model_class"].rpartition(".")
    model_cls = getattr(importlib.import_module(module_name), class_name)
    base_dir = folder / case.get("base_dir", "base")
    base = model_cls.from_pretrained(
        base_dir, attn_implementation=case["attn_implementation"], dtype=torch.float32, **case["model_init_kwargs"]
    )
    return case, base.eval(), load_file(str(folder / "io.safetensors"))


def run_case(case: dict, model, io: dict):
    inputs = {name: io[spec["io_key"]] for name, spec in case["inputs"].items()}
    with torch.no_grad():
        return model(**inputs, **case["call_kwargs"])


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
