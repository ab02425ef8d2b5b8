"""LoRA+ vs LoRA: training loss after the same number of steps at the same learning rate, and step time.

Model: a randomly initialised 2-layer Llama (width 64, vocab 256); task: fit 32 fixed random sequences of 32
tokens (batch 8, cycling), so the loss falls only as far as the adapter learns. Both variants get the same base
weights, the same LoRA initialisation (``r=8``, ``lora_alpha=16`` on every attention and MLP projection) and the
same batches; they differ only in the optimizer: LoRA is ``AdamW(lr)`` on every LoRA matrix, LoRA+ is
``create_lora_plus_optimizer`` (``A`` at ``lr``, ``B`` at ``16·lr``). Loss is measured on the whole set every
``--every`` steps (in eval mode, no gradient). Step time: median of the timed steps (forward, backward, optimizer
step) after ``--warmup`` steps, the two variants taking turns step by step at the middle learning rate (the
third by default), on one thread. Everything is seeded, so the losses repeat exactly on the same machine and
versions.

Run: ``python benchmarks/loraplus.py`` (writes ``benchmarks/results/loraplus.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import LoraPlusConfig, create_lora_plus_optimizer

RESULT = Path(__file__).resolve().parent / "results" / "loraplus.json"
MODEL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0}
RATIO = 16.0


def dataset() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, MODEL["vocab_size"], (32, 32), generator=generator)


def build(variant: str, lr: float):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**MODEL))
    torch.manual_seed(1)
    if variant == "lora":
        model = get_peft_model(base, LoraConfig(**LORA))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    else:
        model = get_peft_model(base, LoraPlusConfig(**LORA, loraplus_lr_ratio=RATIO))
        optimizer = create_lora_plus_optimizer(model, lr=lr, weight_decay=0.0)
    return model, optimizer


def step(model, optimizer, batch: torch.Tensor) -> None:
    model.train()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, data: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=data, labels=data).loss)


def batches(data: torch.Tensor, steps: int, batch_size: int = 8):
    for i in range(steps):
        start = (i * batch_size) % len(data)
        yield data[start : start + batch_size]


def train(variant: str, lr: float, steps: int, every: int, data: torch.Tensor) -> list[float]:
    model, optimizer = build(variant, lr)
    curve = [evaluate(model, data)]
    for i, batch in enumerate(batches(data, steps), start=1):
        step(model, optimizer, batch)
        if i % every == 0:
            curve.append(evaluate(model, data))
    return curve


def step_times(lr: float, steps: int, warmup: int, data: torch.Tensor) -> dict[str, float]:
    runs = {variant: build(variant, lr) for variant in ("lora", "loraplus")}
    times: dict[str, list[float]] = {variant: [] for variant in runs}
    for i, batch in enumerate(batches(data, steps + warmup)):
        for variant, (model, optimizer) in runs.items():
            started = time.perf_counter()
            step(model, optimizer, batch)
            if i >= warmup:
                times[variant].append(time.perf_counter() - started)
    return {variant: statistics.median(values) for variant, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--timed-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = dataset()

    final, curves = {}, {}
    for lr in args.lrs:
        key = f"lr={lr:g}"
        lora = train("lora", lr, args.steps, args.every, data)
        plus = train("loraplus", lr, args.steps, args.every, data)
        curves[key] = {"lora": [round(v, 4) for v in lora], "loraplus": [round(v, 4) for v in plus]}
        final[key] = {"lora": round(lora[-1], 4), "loraplus": round(plus[-1], 4)}
        print(f"{key}: start {lora[0]:.4f}, after {args.steps} steps LoRA {lora[-1]:.4f}, LoRA+ {plus[-1]:.4f}")

    middle = args.lrs[len(args.lrs) // 2]
    times = step_times(middle, args.timed_steps, args.warmup, data)
    result = {
        "command": " ".join(["python benchmarks/loraplus.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": f"{platform.machine()} CPU, 1 thread",
        "model": "Llama 2×64 (4 heads, MLP 128), vocab 256, random weights",
        "task": "fit 32 fixed random sequences of 32 tokens, batch 8",
        "lora": f"r=8, lora_alpha=16 on {', '.join(TARGETS)}; AdamW, weight_decay 0",
        "loraplus_lr_ratio": RATIO,
        "steps": args.steps,
        "initial_loss": curves[f"lr={args.lrs[0]:g}"]["lora"][0],
        "final_loss": final,
        "step_ms": {variant: round(1000 * seconds, 3) for variant, seconds in times.items()},
        "loraplus_vs_lora_step_time": round(times["loraplus"] / times["lora"], 3),
        "curve_every": args.every,
        "curves": curves,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
