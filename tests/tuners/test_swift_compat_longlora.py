"""ms-swift 4.6.0 LongLoRA checkpoints load through Swift.from_pretrained with ms-swift's (eval) outputs."""

from __future__ import annotations

import pytest
import torch

from peft_swift_ext import LongLoraConfig, Swift

from ..swift_fixtures import FIXTURES, load_case

CASE = FIXTURES / "llama_longlora"

pytestmark = pytest.mark.skipif(not (CASE / "case.json").is_file(), reason="ms-swift fixture llama_longlora missing")


def test_swift_checkpoint_gives_swift_outputs():
    case, base, io = load_case("llama_longlora")
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    config = model.peft_config["default"]
    assert isinstance(config, LongLoraConfig) and config.group_size_ratio == 0.25
    with torch.no_grad():
        logits = model(input_ids=io["input.input_ids"], **case["call_kwargs"]).logits
    torch.testing.assert_close(logits, io["output.logits"], atol=1e-5, rtol=0)


def test_swift_checkpoint_merges_with_the_same_outputs():
    case, base, io = load_case("llama_longlora")
    merged = Swift.merge_and_unload(Swift.from_pretrained(base, CASE / "ckpt"))
    assert merged.config._attn_implementation == "eager"
    with torch.no_grad():
        logits = merged(input_ids=io["input.input_ids"], **case["call_kwargs"]).logits
    torch.testing.assert_close(logits, io["output.logits"], atol=1e-5, rtol=0)
