"""What a mixed-adapter batch costs: 16 rows over 8 adapters vs the same batch with one adapter, per tuner.

For each tuner, one model holds 8 adapters of that tuner. The same 16-row batch runs twice, interleaved
(A B A B, one warm-up each, median of the repetitions):

- ``one adapter``: one adapter active, no ``adapter_names`` (what a single-adapter server runs);
- ``8 adapters``: ``adapter_names`` names the 8 adapters in turn, two rows each.

The figure is ``8 adapters / one adapter`` for that tuner, on one machine in one run. PEFT's own mixed-batch LoRA
(``PeftModel(..., adapter_names=...)``, which runs one sub-batch per adapter in a loop) is the anchor: it and our
LoRA are measured in one group, all four runs interleaved, so their figures compare directly. LLM tuners run on
SmolLM2-135M's architecture (30 layers, width 576, random weights) over a 16 x 64-token prefill; SCEdit, a
diffusion tuner, runs on a UNet with SD-like blocks (16 latents of 32 x 32). NEFTune is left out: it adds noise
only in training, and a mixed batch is inference only. LLaMA-PRO is measured with and without the KV cache: with
one (as ``generate`` runs), every adapter of the batch runs its new blocks on the whole batch, since the cache's
slots span the batch.

Writes ``benchmarks/results/serving.json``.

    python benchmarks/serving.py            # full size (a few minutes on 2 cores)
    python benchmarks/serving.py --quick    # tiny models, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from swift_overhead import smollm2_shaped  # benchmarks/ (this script's folder): the same SmolLM2-shaped config
from transformers import LlamaForCausalLM

from peft_swift_ext import (
    AdapterConfig,
    LlamaProConfig,
    LoraPlusConfig,
    PromptConfig,
    ResTuningConfig,
    SCEditConfig,
    SideConfig,
    Swift,
)

RESULTS = Path(__file__).parent / "results"
ADAPTERS = 8
ROWS = 16
TARGET = 1.25


def llm_configs(width: int) -> dict[str, Callable[[], PeftConfig]]:
    """One config factory per LLM tuner (each adapter gets its own instance)."""
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return {
        "lora": lambda: LoraConfig(**lora),
        "lora_plus": lambda: LoraPlusConfig(**lora),
        "adapter": lambda: AdapterConfig(dim=width, target_modules=r"model\.layers\.\d+\.mlp", adapter_length=32),
        "prompt": lambda: PromptConfig(
            dim=width,
            target_modules=r"model\.layers\.\d+",
            embedding_pos=0,
            attention_mask_pos="attention_mask",
            position_embeddings_pos="position_embeddings",
            prompt_length=8,
            extract_embedding=True,
        ),
        "side": lambda: SideConfig(
            dim=width, target_modules=r"model\.layers\.\d+\.mlp", side_module_name="mlp", source_hidden_pos=0
        ),
        "restuning": lambda: ResTuningConfig(
            dims=width,
            root_modules=r"model\.layers\.0",
            stem_modules=r"model\.layers\.\d+",
            target_modules="model.norm",
            tuner_cfg="res_adapter",
        ),
        "llamapro": lambda: LlamaProConfig(num_new_blocks=3),
    }


def unet(quick: bool) -> tuple[torch.nn.Module, dict, list[int]]:
    """A UNet with Stable Diffusion's block types, its 16-row inputs, and the SCEdit skip widths."""
    from diffusers import UNet2DConditionModel

    channels = (32, 64) if quick else (128, 256)
    size = 8 if quick else 32
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8 if quick else 32,
        norm_num_groups=8 if quick else 32,
    ).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(ROWS, 4, size, size, generator=generator),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(ROWS, 8, 64, generator=generator),
    }
    skip_widths = [channels[1], channels[0], channels[0], channels[0]]  # the up-block resnets' skip inputs
    return model, inputs, skip_widths


def paired_medians(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
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


def mixed_vs_single(model, inputs: dict, names: list[str], select_one: Callable[[], None], repeats: int) -> dict:
    """Seconds of the batch with one adapter and with ``adapter_names`` spread over ``names``, and their ratio."""
    rows = [names[i % len(names)] for i in range(ROWS)]

    def single() -> None:
        select_one()
        with torch.no_grad():
            model(**inputs)

    def mixed() -> None:
        with torch.no_grad():
            model(**inputs, adapter_names=rows)

    seconds = paired_medians({"one_adapter": single, "mixed": mixed}, repeats)
    return {"seconds": seconds, "ratio": seconds["mixed"] / seconds["one_adapter"]}


def side_by_side(models: list[tuple], inputs: dict, names: list[str], repeats: int) -> list[dict]:
    """:func:`mixed_vs_single` for several ``(model, select_one)`` pairs, all four-way interleaved in one group."""
    rows = [names[i % len(names)] for i in range(ROWS)]
    runs: dict[str, Callable[[], None]] = {}
    for index, (model, select_one) in enumerate(models):

        def single(model=model, select_one=select_one) -> None:
            select_one()
            with torch.no_grad():
                model(**inputs)

        def mixed(model=model) -> None:
            with torch.no_grad():
                model(**inputs, adapter_names=rows)

        runs[f"{index}/one_adapter"], runs[f"{index}/mixed"] = single, mixed
    seconds = paired_medians(runs, repeats)
    out = []
    for index in range(len(models)):
        pair = {"one_adapter": seconds[f"{index}/one_adapter"], "mixed": seconds[f"{index}/mixed"]}
        out.append({"seconds": pair, "ratio": pair["mixed"] / pair["one_adapter"]})
    return out


def swift_model(base: torch.nn.Module, make: Callable[[], PeftConfig], names: list[str]):
    """A SwiftModel with one adapter of ``make`` per name, in eval mode, the first one active."""
    model = Swift.prepare_model(base, {name: make() for name in names}).eval()
    model.set_active_adapters([names[0]])
    return model


def measure(quick: bool) -> dict:
    names = [f"task{i}" for i in range(ADAPTERS)]
    repeats = 3 if quick else 7
    config = smollm2_shaped(quick)
    generator = torch.Generator().manual_seed(2)
    tokens = {"input_ids": torch.randint(0, config.vocab_size, (ROWS, 16 if quick else 64), generator=generator)}
    tokens["attention_mask"] = torch.ones_like(tokens["input_ids"])

    def base() -> LlamaForCausalLM:
        torch.manual_seed(0)
        # a copy: LLaMA-PRO grows its model's config, which must not change the next model's shape
        return LlamaForCausalLM(copy.deepcopy(config)).eval()

    results: dict[str, dict] = {}
    # the anchor: PEFT's mixed-batch LoRA (one sub-batch per adapter), interleaved with our LoRA in one group so
    # that neither side gets the other's warm-up or a quieter stretch of the machine
    lora = llm_configs(config.hidden_size)["lora"]
    peft_model = get_peft_model(base(), lora(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora())
    peft_model.eval()
    ours = swift_model(base(), lora, names)
    results["peft_lora (anchor)"], results["lora"] = side_by_side(
        [
            (peft_model, lambda model=peft_model: model.set_adapter(names[0])),
            (ours, lambda model=ours: model.set_active_adapters([names[0]])),
        ],
        tokens,
        names,
        repeats,
    )
    print(f"{'peft_lora (anchor)':20s} {results['peft_lora (anchor)']['ratio']:.3f}", flush=True)
    del peft_model, ours
    for tuner, make in llm_configs(config.hidden_size).items():
        if tuner in results:
            continue
        model = swift_model(base(), make, names)
        results[tuner] = mixed_vs_single(
            model, tokens, names, lambda model=model: model.set_active_adapters([names[0]]), repeats
        )
        print(f"{tuner:20s} {results[tuner]['ratio']:.3f}", flush=True)
        if tuner == "llamapro":  # its rows split by adapter only where no KV cache spans the batch
            results["llamapro (use_cache=False)"] = mixed_vs_single(
                model,
                {**tokens, "use_cache": False},
                names,
                lambda model=model: model.set_active_adapters([names[0]]),
                repeats,
            )
        del model
    model_unet, latents, skip_widths = unet(quick)
    model = swift_model(
        model_unet, lambda: SCEditConfig(dims=skip_widths, target_modules=r"up_blocks\.\d+\.resnets\.\d+"), names
    )
    results["scedit (UNet)"] = mixed_vs_single(
        model, latents, names, lambda model=model: model.set_active_adapters([names[0]]), repeats
    )
    return {
        "model": f"Llama {config.num_hidden_layers} layers, width {config.hidden_size} (random weights); "
        f"batch {list(tokens['input_ids'].shape)}",
        "unet": f"UNet2DConditionModel, blocks {skip_widths[:2][::-1]}, latents {list(latents['sample'].shape)}",
        "adapters": ADAPTERS,
        "rows": ROWS,
        "target": f"8 adapters / one adapter <= {TARGET}",
        "results": results,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models for a smoke run")
    parser.add_argument("--output", type=Path, help="where to write the JSON (default benchmarks/results/)")
    args = parser.parse_args()
    result = measure(args.quick)
    output = args.output or RESULTS / ("serving_quick.json" if args.quick else "serving.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"{'tuner':22s} {'one adapter':>12s} {'8 adapters':>12s} {'ratio':>7s}")
    for tuner, figures in result["results"].items():
        seconds = figures["seconds"]
        met = "met" if figures["ratio"] <= TARGET else "NOT met"
        print(
            f"{tuner:22s} {seconds['one_adapter']:11.3f}s {seconds['mixed']:11.3f}s {figures['ratio']:7.3f}  "
            f"{'' if 'anchor' in tuner else met}"
        )
    print(f"written to {output}")


if __name__ == "__main__":
    main()
