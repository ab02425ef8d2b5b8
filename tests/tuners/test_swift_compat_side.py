"""ms-swift 4.6.0 Side checkpoints load through Swift.from_pretrained and give ms-swift's outputs."""

from __future__ import annotations

import torch

from peft_swift_ext import SideConfig, Swift

from ..swift_fixtures import FIXTURES, load_case, run_case


def test_mlp_side_on_bert_encoder_matches_ms_swift():
    case, base, io = load_case("bert_side_mlp")
    model = Swift.from_pretrained(base, FIXTURES / "bert_side_mlp" / "ckpt").eval()
    assert isinstance(model.peft_config["default"], SideConfig)
    output = run_case(case, model, io)
    torch.testing.assert_close(output.last_hidden_state, io["output.last_hidden_state"], atol=1e-5, rtol=0)


def test_fcn4_side_on_the_root_model_matches_ms_swift():
    # ms-swift targets the model itself with target_modules=''; the side network reads the image.
    case, base, io = load_case("vit_side_fcn4")
    model = Swift.from_pretrained(base, FIXTURES / "vit_side_fcn4" / "ckpt").eval()
    output = run_case(case, model, io)
    torch.testing.assert_close(output.logits, io["output.logits"], atol=1e-5, rtol=0)
    model.deactivate_adapter("default")
    torch.testing.assert_close(run_case(case, model, io).logits, io["base_output.logits"], atol=1e-5, rtol=0)
