"""Running a workflow with the HF Trainer, as a user does: train, checkpoint, resume."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_swift_ext.techniques import LisaCallback
from peft_swift_ext.tuners import create_lora_plus_optimizer

from .cases import Workflow

STEPS = 4


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    """Small, deterministic CPU training: 4 steps of 2 examples, a checkpoint every 2 steps."""
    options = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 100,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "label_names": ["labels"],
    }
    return TrainingArguments(**{**options, **overrides})


def trainer(workflow: Workflow, model: nn.Module, output_dir: Path, **overrides) -> Trainer:
    """A Trainer for ``model``: LoRA+ adapters get their optimizer groups, LISA its callback."""
    optimizers = (None, None)
    if any(getattr(config, "loraplus_lr_ratio", None) for config in model.peft_config.values()):
        optimizers = (create_lora_plus_optimizer(model, lr=5e-3), None)
    return Trainer(
        model=model,
        args=arguments(output_dir, **overrides),
        train_dataset=workflow.make_dataset(),
        compute_loss_func=workflow.compute_loss,
        callbacks=[LisaCallback()] if workflow.lisa else None,
        optimizers=optimizers,
    )


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that required grad at the start of training, detached (compared bit for bit)."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}
