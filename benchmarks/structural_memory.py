"""Training memory and step time of SCEdit and Res-Tuning against PEFT's LoRA, in one run.

- SCEdit (decoder mode on every up-block resnet, dims = skip widths) vs LoRA r=64 on the attention projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of a small Stable-Diffusion-shaped UNet2DConditionModel.
- Res-Tuning bypass (ms-swift's ViT recipe: embeddings and every layer's output feed ``res_adapter`` blocks whose
  output replaces the final norm's input) vs LoRA r=16 on the attention projections of a ViT-S/16-shaped model,
  once with transformers' default attention (SDPA, which keeps no attention matrix for backward) and once with
  eager attention (which does, as the ViTs of the Res-Tuning paper).

One training step = forward, MSE / cross-entropy loss, backward, AdamW step. Peak memory is the peak of bytes
allocated during one step above what was allocated before it (after a warm-up step, so optimizer states already
exist): on CUDA ``max_memory_allocated`` minus ``memory_allocated``; on CPU, which keeps no allocator statistics,
the profiler's allocation events (``profile_memory=True``) are replayed in time order and the running sum's
maximum taken. Step time: median of ``--repeats`` unprofiled steps, the variants taking turns.

Run: ``python benchmarks/structural_memory.py`` (writes ``benchmarks/results/structural_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peak_memory import peak_bytes
from peft import LoraConfig, get_peft_model

from peft_swift_ext import ResTuningConfig, SCEditConfig
from peft_swift_ext.tuners.scedit.model import unet_skip_channels

RESULT = Path(__file__).resolve().parent / "results" / "structural_memory.json"
UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
VIT = dict(
    image_size=224, patch_size=16, num_channels=3, hidden_size=384, intermediate_size=1536,
    num_hidden_layers=12, num_attention_heads=6, num_labels=10,
)  # fmt: skip
TARGETS = {"scedit": 0.68, "restuning": 0.2}  # the ceilings on peak memory relative to LoRA


def unet_variants(batch: int) -> dict:
    from diffusers import UNet2DConditionModel

    def build(kind: str):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET)
        if kind == "lora-r64":
            config = LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        else:
            skips = unet_skip_channels(unet)
            config = SCEditConfig(dims=list(skips.values()), target_modules=list(skips))
        return get_peft_model(unet, config)

    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(batch, 4, 32, 32, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, 128, generator=generator),
    }
    target = torch.randn(batch, 4, 32, 32, generator=generator)
    loss = lambda model: F.mse_loss(model(**inputs).sample, target)  # noqa: E731
    return {"lora-r64": (build, loss), "scedit": (build, loss)}


def vit_variants(batch: int, attention: str) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    def build(kind: str):
        torch.manual_seed(0)
        vit = ViTForImageClassification(ViTConfig(**VIT, attn_implementation=attention))
        if kind == "lora-r16":
            config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        else:
            config = ResTuningConfig(
                dims=VIT["hidden_size"], root_modules=r"vit\.layers\.0", stem_modules=r"vit\.layers\.\d+",
                target_modules=r"vit\.layernorm", tuner_cfg="res_adapter",
            )  # fmt: skip
        return get_peft_model(vit, config)

    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    loss = lambda model: F.cross_entropy(model(pixel_values=pixels).logits, labels)  # noqa: E731
    return {"lora-r16": (build, loss), "restuning": (build, loss)}


def train_step(model, optimizer, loss_fn) -> None:
    loss_fn(model).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_step_bytes(model, optimizer, loss_fn, device: torch.device) -> int:
    """Peak bytes allocated during one training step above those live when it starts."""
    return peak_bytes(lambda: train_step(model, optimizer, loss_fn), device)


def compare(variants: dict, repeats: int, device: torch.device) -> dict:
    """Peak step memory and median step time of every variant; the first variant is the LoRA baseline."""
    built = {}
    for name, (build, loss_fn) in variants.items():
        model = build(name).to(device).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        train_step(model, optimizer, loss_fn)  # warm-up: optimizer states and allocator caches exist afterwards
        built[name] = (model, optimizer, loss_fn, sum(p.numel() for p in trainable))
    times = {name: [] for name in built}
    for _ in range(repeats):
        for name, (model, optimizer, loss_fn, _) in built.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, loss_fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, (model, optimizer, loss_fn, trainable) in built.items():
        rows[name] = {
            "trainable_params": trainable,
            "peak_step_mib": round(peak_step_bytes(model, optimizer, loss_fn, device) / 2**20, 2),
            "median_step_s": round(statistics.median(times[name]), 4),
        }
    baseline = next(iter(rows.values()))
    for row in rows.values():
        row["peak_vs_lora"] = round(row["peak_step_mib"] / baseline["peak_step_mib"], 3)
        row["time_vs_lora"] = round(row["median_step_s"] / baseline["median_step_s"], 3)
    return rows


PARTS = {
    "scedit_vs_lora_unet": lambda batch: unet_variants(batch),
    "restuning_vs_lora_vit_sdpa": lambda batch: vit_variants(batch, "sdpa"),
    "restuning_vs_lora_vit_eager": lambda batch: vit_variants(batch, "eager"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="comparisons to run")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    device = torch.device(args.device)
    # Parts not run now keep their figures from an earlier run with the same setup.
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    setup = {
        "batch": args.batch, "repeats": args.repeats, "device": str(device), "unet": UNET, "vit": VIT,
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    results = previous.get("results", {}) if previous.get("setup") == json.loads(json.dumps(setup)) else {}
    for part in args.parts:
        results[part] = compare(PARTS[part](args.batch), args.repeats, device)
    checks = {}
    for part, rows in results.items():
        tuner = "scedit" if "scedit" in rows else "restuning"
        checks[f"{part}_peak"] = (rows[tuner]["peak_vs_lora"], TARGETS[tuner])
    report = {
        "setup": setup,
        "results": results,
        "targets": {name: {"measured": got, "ceiling": top, "met": got <= top} for name, (got, top) in checks.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2), json.dumps(report["targets"], indent=2), sep="\n")


if __name__ == "__main__":
    main()
