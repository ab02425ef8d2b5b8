"""ms-swift 4.6.0 Side checkpoints load through Swift.from_pretrained and give ms-swift's outputs."""

from __future__ import annotations

import pytest
import torch

from peft_swift_ext import SideConfig, Swift

from ..helpers import state_hash
from ..swift_fixtures import FIXTURES, load_case, run_case


def test_mlp_side_on_bert_encoder_matches_ms_swift():
    case, base, io = load_case("bert_side_mlp")
    model = Swift.from_pretrained(base, FIXTURES / "bert_side_mlp" / "ckpt").eval()
    assert isinstance(model.peft_config["default"], SideConfig)
    output = run_case(case, model, io)
    torch.testing.assert_close(output.last_hidden_state, io["output.last_hidden_state"], atol=1e-5, rtol=0)


def test_side_on_the_root_module_is_refused_clearly_and_leaves_the_model_alone():
    # ms-swift can patch the root's forward (target_modules=''); a PEFT tuner cannot replace the root module.
    _, base, _ = load_case("vit_side_fcn4")
    before = state_hash(base)
    with pytest.raises(ValueError, match="SideConfig.target_modules='' selects the root model"):
        Swift.from_pretrained(base, FIXTURES / "vit_side_fcn4" / "ckpt")
    assert state_hash(base) == before
