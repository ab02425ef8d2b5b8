"""HF Trainer: train, checkpoint, resume — for every tuner, through both entry points.

A run of 4 steps equals a run stopped at its step-2 checkpoint and resumed in a fresh process-like setup (a new
model, a new Trainer) — every weight bit for bit (CPU, fp32). Checkpoints hold only the adapters: a SwiftModel's
in SWIFT's layout with ``configuration.json``, within 1.1x the adapters' own size.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from peft_swift_ext import SwiftModel

from .cases import ids, parametrize
from .training import trained_tensors, trainer

pytestmark = pytest.mark.parametrize(("workflow", "entry"), parametrize(), ids=ids())


def _adapter_bytes(model) -> int:
    if isinstance(model, SwiftModel):
        tensors = [t for name in model.peft_config for t in model.adapter_state_dict(name).values()]
    else:
        from peft.utils import get_peft_model_state_dict

        tensors = [
            t for name in model.peft_config for t in get_peft_model_state_dict(model, adapter_name=name).values()
        ]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_resumed_training_equals_uninterrupted_training(workflow, entry, tmp_path):
    straight = workflow.build(entry)
    trainer(workflow, straight, tmp_path / "straight").train()
    expected = trained_tensors(straight)

    resumed = workflow.build(entry)
    trainer(workflow, resumed, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "straight/checkpoint-2")
    )
    actual = trained_tensors(resumed)

    assert actual.keys() == expected.keys()
    differing = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not differing, f"resumed run differs from the uninterrupted one in {differing[:5]}"
    moved = [
        name
        for name, value in expected.items()
        if not torch.equal(value, trained_tensors(workflow.build(entry))[name])
    ]
    assert moved, "training changed nothing, so the comparison proves nothing"


def test_checkpoints_hold_only_the_adapters(workflow, entry, tmp_path):
    model = workflow.build(entry)
    trainer(workflow, model, tmp_path, max_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    weight_files = [path for path in checkpoint.rglob("*") if path.name.startswith("adapter_model")]
    assert weight_files and not (checkpoint / "model.safetensors").exists()
    saved = sum(path.stat().st_size for path in weight_files)
    own = _adapter_bytes(model)
    assert saved <= 1.1 * own + 4096 * len(weight_files), f"checkpoint weights {saved} B vs adapters {own} B"
    if isinstance(model, SwiftModel):
        order = json.loads((checkpoint / "configuration.json").read_text())
        assert order["adapter_order"] == list(model.peft_config)
        assert all((checkpoint / name / "adapter_config.json").is_file() for name in model.peft_config)
    else:
        assert isinstance(model, PeftModel) and (checkpoint / "adapter_config.json").is_file()
