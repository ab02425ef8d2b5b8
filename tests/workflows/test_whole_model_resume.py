"""HF Trainer resume of full fine-tuning beside NEFTune (docs/tuners/neftune.md's recipe) on a SwiftModel.

Such a checkpoint holds the whole base model at its root (ms-swift's layout). The Trainer then reads the root's
``model.safetensors`` itself and hands its plain-model keys to ``SwiftModel.load_state_dict``: they must reach the
base weights (the run continues bit for bit), and a model whose adapters hold weights the Trainer does not read there
is refused by name rather than resumed with untrained adapters.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Trainer

from peft_swift_ext import NEFTuneConfig, Swift

from .cases import _llama, _lm_dataset
from .training import arguments


def _full_fine_tuning(tied: bool, extra_lora: bool = False):
    torch.manual_seed(0)
    configs = {"noise": NEFTuneConfig(noise_alpha=5.0)}
    if extra_lora:
        configs["lora"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = Swift.prepare_model(_llama(tied)(), configs)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def _trainer(model, folder):
    return Trainer(model=model, args=arguments(folder), train_dataset=_lm_dataset())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resuming_full_fine_tuning_beside_neftune_equals_the_uninterrupted_run(tied, tmp_path):
    straight = _full_fine_tuning(tied)
    _trainer(straight, tmp_path / "straight").train()
    assert (tmp_path / "straight/checkpoint-2/model.safetensors").is_file()  # the layout this is about

    resumed = _full_fine_tuning(tied)
    _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "straight/checkpoint-2"))

    expected, actual = straight.state_dict(), resumed.state_dict()
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not differing, f"the resumed run differs in {differing[:5]}"
    fresh = _full_fine_tuning(tied).state_dict()
    assert any(not torch.equal(expected[key], fresh[key]) for key in expected), "training changed nothing"


def test_a_whole_model_state_dict_is_refused_when_adapters_hold_weights_it_lacks(tmp_path):
    model = _full_fine_tuning(tied=False, extra_lora=True)
    _trainer(model, tmp_path / "run").train()
    resumed = _full_fine_tuning(tied=False, extra_lora=True)
    before = {key: value.clone() for key, value in resumed.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapters \['lora'\] have weights it does not hold"):
        _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run/checkpoint-2"))
    assert all(torch.equal(before[key], value) for key, value in resumed.state_dict().items())
