"""The demo's fine-tuning run through the Hugging Face ``Trainer`` instead of the plain loop (``--trainer``).

The same optimizer (LoRA+ groups from ``create_optimizer_param_groups``) and schedule drive it; the Trainer
checkpoints the adapters halfway in SWIFT's layout, and the run's loss curve comes from its logs.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import Example, collate


class _LossLog(TrainerCallback):
    """Collects the training loss the Trainer logs at every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        """Keep the step's loss (``TrainerCallback``'s signature)."""
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def train_with_trainer(
    model: nn.Module,
    optimizer,
    scheduler,
    examples: list[Example],
    pad_token_id: int,
    steps: int,
    batch_size: int,
    seed: int,
    output_dir: Path,
    show_progress: bool = True,
) -> list[float]:
    """Run ``steps`` optimizer steps with ``transformers.Trainer`` and return the loss of each.

    Args:
        model: the tuned model (a ``SwiftModel``: the Trainer saves only its adapters).
        optimizer: the optimizer over the model's parameter groups.
        scheduler: its learning-rate schedule.
        examples: the training examples.
        pad_token_id: the tokenizer's padding id.
        steps: optimizer steps.
        batch_size: examples per step.
        seed: the Trainer's seed (data order).
        output_dir: where the Trainer writes its checkpoints.
        show_progress: draw the Trainer's progress bar.
    """
    log = _LossLog()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(1, steps // 2),
        save_total_limit=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=not show_progress,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, pad_token_id),
        optimizers=(optimizer, scheduler),
        callbacks=[log],
    )
    trainer.train()
    model.eval()
    return log.losses
