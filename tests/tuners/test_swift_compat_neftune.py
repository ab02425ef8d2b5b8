"""ms-swift 4.6.0 NEFTune checkpoints (the whole trained model at the root, no adapter weights) load through
Swift.from_pretrained with ms-swift's outputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_swift_ext import NEFTuneConfig, Swift

from ..helpers import state_hash
from ..swift_fixtures import FIXTURES, load_case, run_case

CASE = FIXTURES / "llama_neftune"

pytestmark = pytest.mark.skipif(not (CASE / "case.json").is_file(), reason="ms-swift fixture llama_neftune missing")


def test_the_fixture_is_ms_swift_s_whole_model_layout():
    ckpt = CASE / "ckpt"
    assert sorted(path.name for path in ckpt.iterdir()) == [
        "config.json", "configuration.json", "default", "generation_config.json", "model.safetensors",
    ]  # fmt: skip
    assert sorted(path.name for path in (ckpt / "default").iterdir()) == ["adapter_config.json"]
    assert json.loads((ckpt / "default" / "adapter_config.json").read_text())["swift_type"] == "neftune"
    assert json.loads((ckpt / "configuration.json").read_text()) == {}


def test_swift_checkpoint_on_the_untouched_base_gives_the_trained_outputs():
    case, base, io = load_case("llama_neftune")
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    logits = run_case(case, model, io).logits
    torch.testing.assert_close(logits, io["output.logits"], atol=1e-5, rtol=0)
    assert (logits - io["base_output.logits"]).abs().max() > 1e-2, "the checkpoint's training is in the outputs"
    config = model.peft_config["default"]
    assert isinstance(config, NEFTuneConfig) and config.noise_alpha == 5.0
    # the noise is on in training mode, with NEFTune's magnitude alpha / sqrt(L * d)
    embeddings = model.base_model.get_input_embeddings().train()
    ids = io["input.input_ids"]
    with torch.no_grad():
        noise = embeddings(ids) - embeddings.get_base_layer()(ids)
    assert 0 < noise.abs().max() <= 5.0 / math.sqrt(ids.shape[1] * 32) * (1 + 1e-5)


def test_swift_checkpoint_on_the_model_saved_at_its_root_gives_the_same_outputs():
    """ms-swift's own way: the base model loaded from the checkpoint folder, then Swift.from_pretrained."""
    case, _, io = load_case("llama_neftune")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(CASE / "ckpt", attn_implementation="eager", dtype=torch.float32).eval()
    model = Swift.from_pretrained(base, CASE / "ckpt").eval()
    torch.testing.assert_close(run_case(case, model, io).logits, io["output.logits"], atol=1e-5, rtol=0)


def test_a_root_model_that_does_not_fit_is_refused_before_the_model_changes(tmp_path):
    _, base, _ = load_case("llama_neftune")
    ckpt = shutil.copytree(CASE / "ckpt", tmp_path / "ckpt")
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"] = torch.zeros(7)
    del weights["lm_head.weight"]
    save_file(weights, str(ckpt / "model.safetensors"))
    before = state_hash(base)
    message = r"does not fit this model: mismatched keys: model\.norm\.weight.*missing keys: lm_head\.weight"
    with pytest.raises(ValueError, match=message):
        Swift.from_pretrained(base, ckpt)
    assert state_hash(base) == before and not any("base_layer" in name for name, _ in base.named_modules())


def test_a_recorded_whole_model_that_is_gone_is_named(tmp_path):
    _, base, _ = load_case("llama_neftune")
    ckpt = shutil.copytree(CASE / "ckpt", tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "configuration.json").write_text(json.dumps({"whole_model": True}))
    before = state_hash(base)
    with pytest.raises(FileNotFoundError, match="records the whole base model, but .* holds no model.safetensors"):
        Swift.from_pretrained(base, ckpt)
    assert state_hash(base) == before


def test_an_adapter_with_weights_still_needs_its_weights_file(tmp_path):
    """Only a weightless tuner (NEFTune) may come without a weights file."""
    _, base, _ = load_case("llama_neftune")
    ckpt = shutil.copytree(CASE / "ckpt", tmp_path / "ckpt")
    config = {"swift_type": "LoRA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (ckpt / "lora").mkdir()
    (ckpt / "lora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin in .*lora"):
        Swift.from_pretrained(base, ckpt)
