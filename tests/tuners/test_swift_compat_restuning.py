"""ms-swift 4.6.0 Res-Tuning checkpoints load through Swift.from_pretrained with ms-swift's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_swift_ext import ResTuningConfig, Swift
from peft_swift_ext.conversion import state_dict_from_swift

from ..swift_fixtures import FIXTURES, load_case

CASE = FIXTURES / "vit_restuning"

pytestmark = pytest.mark.skipif(not (CASE / "case.json").is_file(), reason="ms-swift fixture vit_restuning missing")


def run(model, io):
    with torch.no_grad():
        return model(pixel_values=io["input.pixel_values"], output_hidden_states=False)


def test_swift_checkpoint_gives_swift_outputs():
    _, base, io = load_case("vit_restuning")
    torch.testing.assert_close(run(base, io).logits, io["base_output.logits"], atol=1e-5, rtol=0)
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    assert isinstance(model.peft_config["default"], ResTuningConfig)
    torch.testing.assert_close(run(model, io).logits, io["output.logits"], atol=1e-5, rtol=0)


def test_swift_keys_move_under_the_target_layer():
    _, base, _ = load_case("vit_restuning")
    saved = load_file(str(CASE / "ckpt" / "default" / "adapter_model.safetensors"))
    config = ResTuningConfig(
        **{
            k: v
            for k, v in json.loads((CASE / "ckpt" / "default" / "adapter_config.json").read_text()).items()
            if k not in ("swift_type", "model_key_mapping")
        }
    )
    translated = state_dict_from_swift("restuning", saved, "default", config, base)
    key = "restuning_default.bypass_blocks.1.vertical_tuner.tuner.ln2.weight"
    assert torch.equal(translated["vit.layernorm.restuning_bypass.default.blocks.1.vertical.ln2.weight"], saved[key])
    assert len(translated) == len(saved)
