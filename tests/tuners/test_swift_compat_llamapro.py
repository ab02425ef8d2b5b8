"""ms-swift 4.6.0 LLaMA-PRO checkpoints load through Swift.from_pretrained with ms-swift's outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft_swift_ext import LlamaProConfig, Swift

from ..swift_fixtures import FIXTURES, load_case

CASE = FIXTURES / "llama_llamapro"

pytestmark = pytest.mark.skipif(not (CASE / "case.json").is_file(), reason="ms-swift fixture llama_llamapro missing")


def test_swift_checkpoint_gives_swift_outputs():
    case, base, io = load_case("llama_llamapro")
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    with torch.no_grad():
        logits = model(input_ids=io["input.input_ids"], **case["call_kwargs"]).logits
    torch.testing.assert_close(logits, io["output.logits"], atol=1e-5, rtol=0)
    assert isinstance(model.peft_config["default"], LlamaProConfig)
    assert base.config.num_hidden_layers == 6


def test_swift_checkpoint_merges_into_the_expanded_model_ms_swift_built():
    case, base, io = load_case("llama_llamapro")
    merged = Swift.merge_and_unload(Swift.from_pretrained(base, CASE / "ckpt"))
    assert len(merged.model.layers) == 6
    saved = load_file(str(CASE / "ckpt" / "default" / "adapter_model.safetensors"))
    state = merged.state_dict()
    assert all(torch.equal(state[key], tensor) for key, tensor in saved.items())
    with torch.no_grad():
        logits = merged(input_ids=io["input.input_ids"], **case["call_kwargs"]).logits
    torch.testing.assert_close(logits, io["output.logits"], atol=1e-5, rtol=0)
