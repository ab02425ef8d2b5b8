"""The demo's plain-PyTorch training loop, held-out evaluation and greedy sampling."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import IGNORE_INDEX, Example, eval_batches, prompt_ids


def make_optimizer(
    param_groups: list[dict], lr: float, steps: int, warmup_fraction: float = 0.1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up then cosine decay to zero.

    The schedule multiplies each group's own learning rate, so LoRA+'s B/A ratio is kept throughout.

    Args:
        param_groups: parameter groups, e.g. from ``SwiftModel.create_optimizer_param_groups``.
        lr: the default learning rate (groups may set their own).
        steps: number of optimizer steps the schedule spans.
        warmup_fraction: share of ``steps`` spent warming up.
    """
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0)
    warmup = max(1, round(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens of a batch, and how many tokens that is."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.inference_mode()
def evaluate_loss(model: nn.Module, examples: list[Example], pad_token_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over ``examples`` (the model is put in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_token_id):
        loss, tokens = response_loss(model, batch)
        total, count = total + loss.item(), count + tokens
    return total / count


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    show_progress: bool = True,
) -> list[float]:
    """Run ``steps`` optimizer steps and return the training loss of each (mean per response token).

    Args:
        model: the tuned model; only parameters with ``requires_grad`` change.
        optimizer: holds exactly the trainable parameters.
        scheduler: stepped once per optimizer step.
        batches: training batches (see ``data.training_batches``).
        steps: number of steps.
        show_progress: draw a tqdm bar with the loss and tokens per second.
    """
    from tqdm.auto import tqdm

    model.train()
    losses: list[float] = []
    progress = tqdm(range(steps), desc="training", unit="step", disable=not show_progress)
    started = time.perf_counter()
    seen_tokens = 0
    for _ in progress:
        batch = next(batches)
        loss_sum, tokens = response_loss(model, batch)
        loss = loss_sum / tokens
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen_tokens += int(batch["attention_mask"].sum())
        speed = seen_tokens / (time.perf_counter() - started)
        progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_per_s=f"{speed:.0f}")
    model.eval()
    return losses


@torch.inference_mode()
def generate_answer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, instruction: str, max_new_tokens: int = 40
) -> str:
    """The model's greedy answer to one instruction, formatted with the chat template."""
    model.eval()
    input_ids = torch.tensor([prompt_ids(tokenizer, instruction)])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
