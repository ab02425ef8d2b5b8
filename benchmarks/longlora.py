"""LongLoRA benchmark: one training step (forward, backward, AdamW) with S²-Attn vs the same LoRA with full attention.

Model: a 2-layer Llama with 8 heads of width 16 and a 128-wide MLP, so attention dominates the cost at long
sequences. The full-attention baseline is PEFT's LoRA with the same rank, targets and trainable embeddings /
norms (``modules_to_save``). Step time: fastest of ``--repeats`` steps after one warm-up, the variants taking
turns. Peak memory: the peak of bytes allocated during one step above what was allocated before it, replayed from
the profiler's allocation events (the CPU allocator keeps no statistics). The log-log slope is that of peak
memory from the shortest to the longest sequence: 2 for memory quadratic in the length, 1 for linear.

Run: ``python benchmarks/longlora.py`` (writes ``benchmarks/results/longlora.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from peak_memory import peak_bytes
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import LongLoraConfig
from peft_swift_ext.tuners.longlora.model import trainable_module_names

RESULT = Path(__file__).resolve().parent / "results" / "longlora.json"
MODEL = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# name -> (attention implementation, S² options or None for full attention)
VARIANTS = {
    "full-eager": ("eager", None),
    "s2-eager-ratio0.25": ("eager", {"group_size_ratio": 0.25}),
    "s2-eager-group512": ("eager", {"group_size": 512}),
    "full-sdpa": ("sdpa", None),
    "s2-sdpa-ratio0.25": ("sdpa", {"group_size_ratio": 0.25}),
    "s2-sdpa-group512": ("sdpa", {"group_size": 512}),
}


def build(implementation: str, s2: dict | None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation=implementation))
    if s2 is None:
        config = LoraConfig(**LORA, modules_to_save=trainable_module_names(model, ["embed", "norm"]))
    else:
        config = LongLoraConfig(**LORA, **s2)
    model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, input_ids: torch.Tensor) -> None:
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_step_bytes(model, optimizer, input_ids: torch.Tensor) -> int:
    return peak_bytes(lambda: step(model, optimizer, input_ids))


def measure(names: list[str], lengths: list[int], repeats: int) -> dict:
    """Per variant and length: fastest of ``repeats`` steps and the peak memory of one step.

    Variants take turns within each repeat, so load from other processes affects them alike; the minimum is the
    least disturbed step.
    """
    built = {name: build(*VARIANTS[name]) for name in names}
    results: dict[str, dict] = {name: {} for name in names}
    for length in lengths:
        input_ids = torch.randint(0, MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            step(*built[name], input_ids)  # warm-up (and the optimizer's state)
        for _ in range(repeats):
            for name in names:
                start = time.perf_counter()
                step(*built[name], input_ids)
                times[name].append(time.perf_counter() - start)
        for name in names:
            results[name][length] = {
                "step_seconds": round(min(times[name]), 4),
                "peak_mib": round(peak_step_bytes(*built[name], input_ids) / 2**20, 2),
            }
            row = results[name][length]
            print(f"{name:22s} L={length:5d} {row['step_seconds']:.3f}s {row['peak_mib']:.1f} MiB", flush=True)
    return results


def slope(rows: dict, key: str) -> float:
    first, last = min(rows), max(rows)
    return math.log(rows[last][key] / rows[first][key]) / math.log(last / first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = measure(args.variants, args.lengths, args.repeats)
    if set(args.variants) != set(VARIANTS) and RESULT.is_file():
        # a partial run updates its variants and keeps the others' earlier figures
        earlier = {
            name: {int(k): v for k, v in rows.items()}
            for name, rows in json.loads(RESULT.read_text())["results"].items()
        }
        results = {**earlier, **results}
    longest = max(args.lengths)
    summary = {}
    for name, rows in results.items():
        implementation, s2 = VARIANTS[name]
        rows = {length: rows[length] for length in args.lengths}
        entry = {"memory_loglog_slope": round(slope(rows, "peak_mib"), 3)}
        baseline = results.get(f"full-{implementation}")
        if s2 is not None and baseline is not None:
            entry[f"step_time_vs_full_at_{longest}"] = round(
                rows[longest]["step_seconds"] / baseline[longest]["step_seconds"], 3
            )
            entry[f"peak_memory_vs_full_at_{longest}"] = round(
                rows[longest]["peak_mib"] / baseline[longest]["peak_mib"], 3
            )
        summary[name] = entry
    report = {
        "command": "python benchmarks/longlora.py "
        + " ".join([f"--lengths {' '.join(map(str, args.lengths))}", f"--repeats {args.repeats}"]),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "load_average_before_and_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "model": MODEL,
        "lora": LORA,
        "summary": summary,
        "results": results,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
