"""The distributed examples run as documented, with 2 CPU processes, and their checkpoints are right."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from .conftest import REPO, free_port, launch_env, torchrun

EXAMPLES = REPO / "examples"


@functools.cache
def example_module():
    """examples/accelerate_fsdp.py, imported (its model and data are the reference's too)."""
    spec = importlib.util.spec_from_file_location("accelerate_fsdp_example", EXAMPLES / "accelerate_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process_reference() -> torch.nn.Module:
    """The example's training in one process: each global batch whole, the loss the mean of its two halves."""
    example = example_module()
    model = example.build_model()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=example.LR)
    ids = example.dataset().tensors[0]
    for batch in ids.split(example.GLOBAL_BATCH):
        halves = batch.chunk(2)
        loss = sum(model(input_ids=h, labels=h).loss for h in halves) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def check_checkpoint(folder, want_model: torch.nn.Module) -> torch.Tensor:
    """Full adapter tensors only; loads in one process; returns the loaded model's logits."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(want_model)
    assert sorted(saved) == sorted(expected), "the checkpoint must hold exactly the adapter tensors"
    assert all(saved[k].shape == v.shape for k, v in expected.items()), "shards instead of full tensors"
    example = example_module()
    fresh = example.build_model().get_base_model()
    loaded = PeftModel.from_pretrained(fresh, folder).eval()
    with torch.no_grad():
        return loaded(input_ids=example.dataset().tensors[0][:2]).logits


def test_accelerate_launch_example(tmp_path):
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "examples/accelerate_fsdp.yaml"]
    command += [f"--main_process_port={free_port()}", "examples/accelerate_fsdp.py", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "2 processes" in result.stdout
    sharded_line = next(line for line in result.stdout.splitlines() if "parameters sharded" in line)
    assert int(sharded_line.split()[0]) > 0, sharded_line
    want_model = single_process_reference()
    got = load_file(str(out / "adapter_model.safetensors"))
    want = get_peft_model_state_dict(want_model)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, f"accelerate FSDP2 run differs from one process by {worst:.3g}"
    logits = check_checkpoint(out, want_model)
    with torch.no_grad():
        reference = want_model.eval()(input_ids=example_module().dataset().tensors[0][:2]).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_trainer_example(tmp_path):
    result = torchrun(["examples/trainer_fsdp.py", "--output_dir", str(tmp_path)])
    assert "on 2 processes" in result.stdout, result.stdout[-2000:]
    example = example_module()
    initial = example.build_model()
    logits = check_checkpoint(tmp_path / "adapter", initial)
    with torch.no_grad():
        before = initial.eval()(input_ids=example.dataset().tensors[0][:2]).logits
    assert (logits - before).abs().max() > 1e-4, "the Trainer did not change the adapter"
    assert torch.isfinite(logits).all()


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    # trainer_fsdp.py imports its sibling accelerate_fsdp.py, as it does when run as a script
    monkeypatch.syspath_prepend(str(EXAMPLES))
