"""One demo run: load, evaluate, fine-tune, evaluate again, save, reload and compare, plot."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..swift import Swift
from .data import collate, encode, load_split, training_batches
from .models import MODEL_LOADERS
from .plot import plot_losses
from .trainer import train_with_trainer
from .training import evaluate_loss, generate_answer, make_optimizer, train
from .tuners import DEFAULT_TUNER, build_tuned_model

SAMPLE_TASK = "json"  # the held-out task whose first instruction is the default sample prompt
RELOAD_TOLERANCE = 1e-4  # max |logit difference| allowed between the tuned and the reloaded model


@dataclass
class DemoOptions:
    """Settings of one run (the command-line options).

    Args:
        model: ``"smollm2"`` (the real model) or ``"tiny"`` (random two-layer Llama, for tests).
        tuner: tuner spec, see :func:`peft_swift_ext.demo.tuners.parse_tuner_spec`.
        steps: optimizer steps.
        batch_size: training examples per step.
        lr: base learning rate (LoRA+ B matrices get ``lr`` times the ratio).
        out: output folder for the adapter and the loss curve.
        prompt: the instruction answered before and after training; ``None`` takes a held-out one.
        seed: seeds adapter initialisation and data order.
        show_progress: draw the tqdm progress bar.
        trainer: train with the Hugging Face ``Trainer`` (which checkpoints the adapters) instead of the plain loop.
    """

    model: str = "smollm2"
    tuner: str = DEFAULT_TUNER
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-4
    out: Path = Path("peft-swift-demo-output")
    prompt: str | None = None
    seed: int = 0
    show_progress: bool = True
    trainer: bool = False


@dataclass
class DemoReport:
    """What a run measured.

    Args:
        heldout_before: held-out loss per response token before training.
        heldout_after: the same after training.
        train_losses: training loss of each step.
        answer_before: greedy answer to the sample prompt before training.
        answer_after: the same after training.
        reloaded_answer: the answer of the adapter reloaded onto a fresh base model.
        reload_max_diff: largest absolute logit difference between the tuned and the reloaded model.
        adapter_dir: where the adapter was saved.
        plot_path: the loss-curve PNG.
        seconds: wall time of the whole run.
    """

    heldout_before: float
    heldout_after: float
    train_losses: list[float]
    answer_before: str
    answer_after: str
    reloaded_answer: str
    reload_max_diff: float
    adapter_dir: Path
    plot_path: Path
    seconds: float

    @property
    def loss_dropped(self) -> bool:
        return self.heldout_after < self.heldout_before

    @property
    def reload_agrees(self) -> bool:
        return self.reload_max_diff <= RELOAD_TOLERANCE and self.reloaded_answer == self.answer_after


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> DemoReport:
    """Fine-tune ``options.model`` with ``options.tuner`` on the shipped dataset and check the result.

    Args:
        options: the run's settings.
        log: receives every line of the run's report.
    """
    started = time.perf_counter()
    load = MODEL_LOADERS[options.model]
    loaded = load(log)
    tokenizer = loaded.tokenizer
    log(f"model: {loaded.description}")
    train_examples = [encode(tokenizer, record) for record in load_split("train")]
    heldout_records = load_split("heldout")
    heldout_examples = [encode(tokenizer, record) for record in heldout_records]
    log(f"data: {len(train_examples)} train / {len(heldout_examples)} held-out examples (loss on the answers only)")
    sample = next(record for record in heldout_records if record["task"] == SAMPLE_TASK)
    prompt = options.prompt or sample["instruction"]

    torch.manual_seed(options.seed)
    model = build_tuned_model(loaded.model, options.tuner)
    log(f"tuner: {options.tuner} -> adapters {model.adapters}")
    log(model.get_trainable_parameters())

    heldout_before = evaluate_loss(model, heldout_examples, tokenizer.pad_token_id)
    answer_before = generate_answer(model, tokenizer, prompt)
    log(f"held-out loss before training: {heldout_before:.4f}")

    optimizer, scheduler = make_optimizer(
        model.create_optimizer_param_groups(lr=options.lr), options.lr, options.steps
    )
    if options.trainer:
        train_losses = train_with_trainer(
            model,
            optimizer,
            scheduler,
            train_examples,
            tokenizer.pad_token_id,
            options.steps,
            options.batch_size,
            options.seed,
            options.out / "trainer",
            options.show_progress,
        )
        log(f"trainer checkpoints (adapters only, SWIFT's layout): {sorted((options.out / 'trainer').iterdir())}")
    else:
        batches = training_batches(train_examples, options.batch_size, tokenizer.pad_token_id, seed=options.seed)
        train_losses = train(model, optimizer, scheduler, batches, options.steps, options.show_progress)

    heldout_after = evaluate_loss(model, heldout_examples, tokenizer.pad_token_id)
    answer_after = generate_answer(model, tokenizer, prompt)
    log(f"held-out loss after {options.steps} steps: {heldout_after:.4f} (before: {heldout_before:.4f})")
    log(f"prompt: {prompt}")
    if options.prompt is None:
        log(f"  expected: {sample['response']}")
    log(f"  before:   {answer_before}")
    log(f"  after:    {answer_after}")

    adapter_dir = options.out / "adapter"
    model.save_pretrained(adapter_dir)
    reloaded = Swift.from_pretrained(load(log).model, adapter_dir)
    inputs = collate(heldout_examples[:8], tokenizer.pad_token_id)
    del inputs["labels"]
    with torch.inference_mode():
        model.eval()
        reloaded.eval()
        reload_max_diff = float((model(**inputs).logits - reloaded(**inputs).logits).abs().max())
    reloaded_answer = generate_answer(reloaded, tokenizer, prompt)
    log(f"saved the adapter to {adapter_dir}")
    log(f"reloaded it onto a fresh base model: max |logit difference| = {reload_max_diff:.2e}")

    plot_path = options.out / "loss_curve.png"
    plot_losses(train_losses, heldout_before, heldout_after, plot_path, f"{options.tuner} on {options.model}")
    log(f"loss curve: {plot_path}")
    return DemoReport(
        heldout_before=heldout_before,
        heldout_after=heldout_after,
        train_losses=train_losses,
        answer_before=answer_before,
        answer_after=answer_after,
        reloaded_answer=reloaded_answer,
        reload_max_diff=reload_max_diff,
        adapter_dir=adapter_dir,
        plot_path=plot_path,
        seconds=time.perf_counter() - started,
    )
