"""What the Swift shim itself costs: SwiftModel vs plain PEFT, per-thread activation, switching, offload.

Every figure is a ratio or a duration measured in this one run, with interleaved (A B A B) repetitions so
machine load affects both sides alike. Writes ``benchmarks/results/swift_overhead.json``.

    python benchmarks/swift_overhead.py            # full size (SmolLM2-135M-shaped model, random weights)
    python benchmarks/swift_overhead.py --quick    # tiny model, for CI smoke runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import Swift

RESULTS = Path(__file__).parent / "results"


def smollm2_shaped(quick: bool) -> LlamaConfig:
    """SmolLM2-135M's architecture (30 layers, width 576), or a tiny one for smoke runs."""
    if quick:
        return LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=30,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


def fresh_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def paired_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, calling them in turn ``repeats`` times after one warm-up each."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def training_step(model, batch):
    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def forward(model, batch):
    def run():
        with torch.no_grad():
            model(input_ids=batch)

    return run


def measure(quick: bool) -> dict:
    config = smollm2_shaped(quick)
    batch = torch.randint(0, config.vocab_size, (2, 32 if quick else 128))
    repeats = 5 if quick else 15

    peft_model = get_peft_model(fresh_model(config), lora_config()).train()
    swift_model = Swift.prepare_model(fresh_model(config), {"default": lora_config()}).train()
    step = paired_medians(
        {"peft": training_step(peft_model, batch), "swift": training_step(swift_model, batch)}, repeats
    )

    swift_model.eval()
    threaded = Swift.prepare_model(fresh_model(config), {"default": lora_config()}, per_thread=True).eval()
    threaded.set_active_adapters(["default"])
    plain = fresh_model(config).eval()
    merged = Swift.merge_and_unload(Swift.prepare_model(fresh_model(config), {"default": lora_config()})).eval()
    inference = paired_medians(
        {
            "base": forward(plain, batch),
            "merged": forward(merged, batch),
            "shared": forward(swift_model, batch),
            "per_thread": forward(threaded, batch),
        },
        repeats,
    )

    switch_times = []
    for _ in range(200):
        start = time.perf_counter()
        swift_model.deactivate_adapter("default")
        swift_model.activate_adapter("default")
        switch_times.append((time.perf_counter() - start) / 2)

    offload_times = []
    for _ in range(5):
        start = time.perf_counter()
        swift_model.deactivate_adapter("default", offload="meta")
        swift_model.activate_adapter("default")
        offload_times.append(time.perf_counter() - start)

    return {
        "model": f"Llama {config.num_hidden_layers} layers, width {config.hidden_size} (random weights)",
        "batch": list(batch.shape),
        "swift_vs_peft_training_step": step["swift"] / step["peft"],
        "merged_vs_base_forward": inference["merged"] / inference["base"],
        "per_thread_vs_shared_forward": inference["per_thread"] / inference["shared"],
        "switch_ms_median": 1000 * statistics.median(switch_times),
        "offload_meta_round_trip_ms_median": 1000 * statistics.median(offload_times),
        "seconds": {"training_step": step, "forward": inference},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model for a smoke run")
    args = parser.parse_args()
    result = measure(args.quick)
    RESULTS.mkdir(exist_ok=True)
    name = "swift_overhead_quick.json" if args.quick else "swift_overhead.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    targets = {
        "swift_vs_peft_training_step": ("<=", 1.02),
        "merged_vs_base_forward": ("<=", 1.01),
        "per_thread_vs_shared_forward": ("<=", 1.05),
        "switch_ms_median": ("<", 1.0),
        "offload_meta_round_trip_ms_median": ("<", 200.0),
    }
    for key, (op, bound) in targets.items():
        value = result[key]
        met = value <= bound if op == "<=" else value < bound
        print(f"{key:38s} {value:10.4f}   target {op} {bound}   {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
