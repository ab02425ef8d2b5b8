"""TRL's SFTTrainer and DPOTrainer with this package's models, as a user runs them (tiny model, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from peft_swift_ext import Swift, SwiftModel
from peft_swift_ext.demo.models import load_tiny

from .cases import _lm_configs

CONFIGS = {name: configs for name, configs in _lm_configs().items() if name != "lora"}


def _build(configs: dict, entry: str):
    loaded = load_tiny(seed=0)
    made = {name: make() for name, make in configs.items()}
    model = get_peft_model(loaded.model.train(), next(iter(made.values()))) if entry == "peft" else None
    if model is None:
        model = Swift.prepare_model(loaded.model.train(), made)
    return model, loaded.tokenizer


def _cases():
    return [
        pytest.param(configs, entry, id=f"{name}-{entry}")
        for name, configs in CONFIGS.items()
        for entry in (("peft", "swift") if len(configs) == 1 else ("swift",))
    ]


@pytest.mark.parametrize(("configs", "entry"), _cases())
def test_sft_trainer_trains_and_saves_only_the_adapters(configs, entry, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _build(configs, entry)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    texts = [f"question {i}: what is {i} + {i}? answer: {2 * i}" for i in range(8)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_length=32,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=False,  # TRL's default trains under bf16 autocast, which the fp32 reload below would not match
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [
        name for name, param in model.named_parameters() if name in before and not torch.equal(param, before[name])
    ]
    assert changed, "SFT changed no adapter weight"
    trainer.save_model(str(tmp_path / "final"))
    saved = tmp_path / "final"
    assert not (saved / "model.safetensors").exists()
    if isinstance(model, SwiftModel):
        reloaded = Swift.from_pretrained(load_tiny(seed=0).model, saved).eval()
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(load_tiny(seed=0).model, saved).eval()
    model.eval()
    inputs = tokenizer(texts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def _preferences() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [f"{i} + {i} =" for i in range(4)],
            "chosen": [f" {2 * i}" for i in range(4)],
            "rejected": [f" {2 * i + 1}" for i in range(4)],
        }
    )


def _dpo(model, tokenizer, tmp_path, ref_model=None):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
    )
    return DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=_preferences(), processing_class=tokenizer
    )


def test_dpo_trainer_trains_a_swift_model_against_a_frozen_copy_of_its_adapter(tmp_path):
    # TRL copies the adapter named "default" into a frozen "ref" adapter and switches to it for the reference
    model, tokenizer = _build({"default": CONFIGS["loraplus"]["lora"]}, "swift")
    trainer = _dpo(model, tokenizer, tmp_path)
    assert "ref" in model.peft_config and model.active_adapters == ["default"]
    ref_before = {name: tensor.clone() for name, tensor in model.adapter_state_dict("ref").items()}
    before = {name: tensor.clone() for name, tensor in model.adapter_state_dict("default").items()}
    trainer.train()
    assert all(torch.equal(tensor, ref_before[name]) for name, tensor in model.adapter_state_dict("ref").items())
    assert any(not torch.equal(tensor, before[name]) for name, tensor in model.adapter_state_dict("default").items())
    assert model.active_adapters == ["default"]


def test_dpo_trainer_with_several_adapter_types_and_a_copied_reference(tmp_path):
    # With adapters of several types TRL's "default" convention does not apply: the reference is a frozen copy of
    # the adapted model (a plain transformers model with the adapters' layers in it, as TRL expects a reference).
    model, tokenizer = _build(CONFIGS["loraplus+adapter+neftune"], "swift")
    reference = copy.deepcopy(model).get_base_model().eval()
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    _dpo(model, tokenizer, tmp_path, ref_model=reference).train()
    assert any(not torch.equal(param, before[name]) for name, param in model.named_parameters() if name in before)
