"""ms-swift 4.6.0 SCEdit checkpoints load through Swift.from_pretrained with ms-swift's outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft_swift_ext import SCEditConfig, Swift

from ..swift_fixtures import FIXTURES, load_case

CASE = FIXTURES / "unet_scedit"

pytestmark = pytest.mark.skipif(not (CASE / "case.json").is_file(), reason="ms-swift fixture unet_scedit missing")


def run(model, io, case) -> torch.Tensor:
    inputs = {name: io[spec["io_key"]] for name, spec in case["inputs"].items()}
    with torch.no_grad():
        return model(**inputs, **case["call_kwargs"]).sample


def test_swift_checkpoint_gives_swift_outputs():
    case, base, io = load_case("unet_scedit")
    torch.testing.assert_close(run(base, io, case), io["base_output.sample"], atol=1e-5, rtol=0)
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    assert isinstance(model.peft_config["default"], SCEditConfig)
    torch.testing.assert_close(run(model, io, case), io["output.sample"], atol=1e-5, rtol=0)


def test_swift_checkpoint_weights_land_in_the_tuners():
    _, base, _ = load_case("unet_scedit")
    model = Swift.from_pretrained(base, CASE / "ckpt")
    saved = load_file(str(CASE / "ckpt" / "default" / "adapter_model.safetensors"))
    ours = model.adapter_state_dict("default")
    assert len(ours) == len(saved)
    for key, tensor in saved.items():
        path, rest = key.split(".scetuner_default.tuner_op.")
        linear, field = rest.split(".")
        assert torch.equal(ours[f"{path}.scedit_{linear}.default.{field}"], tensor)
