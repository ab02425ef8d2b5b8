"""ms-swift 4.6.0 LoRA checkpoints load through Swift.from_pretrained with ms-swift's outputs, and convert."""

from __future__ import annotations

import torch
from peft import PeftModel

from peft_swift_ext import LoraPlusConfig, Swift

from ..swift_fixtures import FIXTURES, load_case, run_case


def test_ms_swift_lora_checkpoint_gives_ms_swift_outputs():
    case, base, io = load_case("llama_lora")
    model = Swift.from_pretrained(base, FIXTURES / "llama_lora" / "ckpt").eval()
    # ms-swift writes lorap_lr_ratio into every LoRA config, so its LoRA arrives as LoRA+ (same weights)
    assert isinstance(model.peft_config["default"], LoraPlusConfig)
    torch.testing.assert_close(run_case(case, model, io).logits, io["output.logits"], atol=1e-5, rtol=0)


def test_ms_swift_lora_checkpoint_converts_to_peft_format(tmp_path):
    case, base, io = load_case("llama_lora")
    Swift.save_to_peft_format(FIXTURES / "llama_lora" / "ckpt", tmp_path)
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(run_case(case, model, io).logits, io["output.logits"], atol=1e-5, rtol=0)


def test_ms_swift_lora_merges_to_the_same_outputs():
    case, base, io = load_case("llama_lora")
    merged = Swift.merge_and_unload(Swift.from_pretrained(base, FIXTURES / "llama_lora" / "ckpt"))
    torch.testing.assert_close(run_case(case, merged, io).logits, io["output.logits"], atol=1e-5, rtol=0)
