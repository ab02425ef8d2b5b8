"""--tuner specs, and every tuner the demo offers trained, saved and reloaded on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from peft_swift_ext import Swift
from peft_swift_ext.demo import tuners
from peft_swift_ext.demo.data import collate, encode, load_split, training_batches
from peft_swift_ext.demo.models import load_tiny
from peft_swift_ext.demo.training import evaluate_loss, generate_answer, make_optimizer, train
from peft_swift_ext.demo.tuners import TUNER_CONFIGS, build_tuned_model, parse_tuner_spec


def test_spec_splits_on_plus():
    assert parse_tuner_spec("lora+neftune") == ["lora", "neftune"]
    assert parse_tuner_spec(" LoRAplus ") == ["loraplus"]


def test_unknown_tuner_lists_the_choices():
    with pytest.raises(ValueError, match="unknown tuner 'lorra'.*loraplus"):
        parse_tuner_spec("lorra")
    with pytest.raises(ValueError, match="unknown tuner ''"):
        parse_tuner_spec("lora+")


def test_repeated_tuner_is_refused():
    with pytest.raises(ValueError, match=r"\['lora'\] more than once"):
        parse_tuner_spec("lora+neftune+lora")


def test_weightless_tuner_alone_is_refused():
    with pytest.raises(ValueError, match=r"no trainable weights.*lora\+neftune"):
        parse_tuner_spec("neftune")


def test_registered_tuner_for_other_models_is_explained(monkeypatch):
    monkeypatch.setitem(tuners.TUNERS, "scedit", object())
    with pytest.raises(ValueError, match="'scedit' does not apply to a causal language model"):
        parse_tuner_spec("scedit")


@pytest.mark.parametrize(
    "spec",
    [
        *(name for name in TUNER_CONFIGS if name not in tuners.WEIGHTLESS_TUNERS),
        "lora+neftune",
        "neftune+longlora",
        "longlora+neftune",
    ],
)
def test_every_tuner_trains_saves_and_reloads(spec, tmp_path):
    loaded = load_tiny()
    tokenizer = loaded.tokenizer
    torch.manual_seed(0)
    model = build_tuned_model(loaded.model, spec)
    assert model.adapters == spec.split("+")
    assert [p for p in model.parameters() if p.requires_grad]
    base_names = {name for name, _ in load_tiny().model.named_parameters()}
    assert not {n for n, p in model.model.named_parameters() if p.requires_grad} & base_names

    examples = [encode(tokenizer, r) for r in load_split("train")[:8]]
    optimizer, scheduler = make_optimizer(model.create_optimizer_param_groups(lr=1e-3), 1e-3, steps=2)
    batches = training_batches(examples, 4, tokenizer.pad_token_id)
    losses = train(model, optimizer, scheduler, batches, steps=2, show_progress=False)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert evaluate_loss(model, examples[:4], tokenizer.pad_token_id) > 0
    assert isinstance(generate_answer(model, tokenizer, "What is 2 + 3?", max_new_tokens=4), str)

    model.save_pretrained(tmp_path)
    reloaded = Swift.from_pretrained(load_tiny().model, tmp_path)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
