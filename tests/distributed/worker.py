"""Trains every tuner case under DDP, FSDP2 and DeepSpeed ZeRO-2/3 in one process group; writes what tests compare.

Run by ``tests/distributed/conftest.py`` once for all engines, as
``python -m torch.distributed.run --nproc_per_node 2 -m tests.distributed.worker --engine ddp,fsdp,zero2,zero3
--out DIR`` (DeepSpeed's ``zero2`` / ``zero3`` where deepspeed is installed), the engines one after another.
Rank 0 writes, per case, ``DIR/<engine>/<case>/``: ``weights.safetensors`` (full trainable tensors after
``STEPS`` steps), ``ckpt/`` (saved with ``save_pretrained_full``) and ``info.json`` (checks made in the
process group). It also trains LoRA with NEFTune (DDP and FSDP2), and LISA and GaLore (DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from peft_swift_ext.distributed import (
    _zero3_gathered,
    full_numel,
    fully_shard_peft_model,
    is_sharded,
    restore_scalar_parameters,
    save_pretrained_full,
    seed_per_rank,
    vectorize_scalar_parameters,
    wrap_modules,
)

from . import common as C


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def gather_objects(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def wrap(model: nn.Module, engine: str) -> nn.Module:
    if engine == "ddp":
        # frozen parameters are skipped by DDP; adapters of inactive branches may get no gradient
        return DistributedDataParallel(model, find_unused_parameters=True)
    return fully_shard_peft_model(model)


def inner(model: nn.Module) -> nn.Module:
    wrapped = isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


def deepspeed_config(stage: int) -> dict:
    """Plain SGD on the averaged gradient, as in the other engines and the single-process reference."""
    return {
        "train_micro_batch_size_per_gpu": C.GLOBAL_BATCH // 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        # DeepSpeed clips the global gradient norm to 1.0 unless told otherwise (deepspeed 0.19.8); the
        # reference does not clip, and adapter-vit / restuning-unet have gradient norms above 1
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": C.LR}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }


def setup(model: nn.Module, engine: str):
    """``(module to call, step(loss, info))`` for one engine; the optimizer is plain SGD in every engine."""
    if engine.startswith("zero"):
        import deepspeed

        vectorize_scalar_parameters(model)  # Side's 0-d side_alpha: DeepSpeed cannot broadcast it
        ds, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=C.trainable(model), config=deepspeed_config(int(engine[-1]))
        )

        def ds_step(loss: torch.Tensor, info: dict) -> None:
            ds.backward(loss)
            ds.step()

        return ds, ds_step
    wrapped = wrap(model, engine)
    optimizer = torch.optim.SGD(C.trainable(model), lr=C.LR)

    def step(loss: torch.Tensor, info: dict) -> None:
        loss.backward()
        if engine == "fsdp":
            # 0-d parameters (Side's side_alpha) stay replicated: fully_shard cannot shard them
            grads = [p.grad for p in C.trainable(model) if p.grad is not None and p.dim() > 0]
            info.setdefault("grad_is_sharded", all(is_sharded(g) for g in grads))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return wrapped, step


def run_tuner(case: C.DistCase, engine: str, folder: Path, rank: int, world: int) -> None:
    model = C.prepare_for_training(case.build())
    names_before = C.trainable_names(model)
    frozen_before = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    units = [type(m).__name__ for m in wrap_modules(model)] if engine == "fsdp" else []
    model, step = setup(model, engine)
    plain = inner(model)
    info: dict = {"fsdp_units": len(units), "unit_classes": units}
    if engine == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        info["fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in plain.modules())
    info["sharded_params"] = sum(is_sharded(p) for p in plain.parameters())
    if engine.startswith("zero"):
        info["gradient_clipping"] = model.gradient_clipping()
    if case.swift:
        info["trainable_summary"] = plain.get_trainable_parameters().split(" || ")[:2]
    else:
        info["trainable_count"] = list(plain.get_nb_trainable_parameters())
    info["full_numel_trainable"] = sum(full_numel(p) for p in plain.parameters() if p.requires_grad)
    inputs = C.shard_inputs(C.global_inputs(case), rank, world)
    for _ in range(C.STEPS):
        step(C.loss_of(case, model, inputs), info)
    params = dict(plain.named_parameters())
    info["trainable_after"] = C.trainable_names(plain) == names_before
    info["frozen_after"] = sorted(n for n, p in params.items() if not p.requires_grad) == frozen_before
    info["frozen_grads_none"] = all(p.grad is None for n, p in params.items() if not p.requires_grad)
    if case.swift:
        info["offload"] = offload_refusal(plain)
    # saved with shape () although DeepSpeed trained vectorize_scalar_parameters' (1,)
    save_pretrained_full(model, folder / "ckpt")
    with _zero3_gathered(list(params.values())):
        restore_scalar_parameters(plain)
        weights = {name: full(params[name]) for name in names_before}
    rank_weights = gather_objects({k: v for k, v in weights.items()} if world <= 2 else None)
    info["ranks_agree"] = all(torch.equal(rank_weights[0][k], rank_weights[1][k]) for k in weights)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "weights.safetensors"))
        (folder / "info.json").write_text(json.dumps(info))


def offload_refusal(model: nn.Module) -> dict:
    """Try offloading adapters; FSDP must refuse each attempt without changing which adapters are active."""
    before = list(model.active_adapters)
    messages = []
    attempts = (
        lambda: model.set_active_adapters(["lora"], offload="meta"),
        lambda: model.deactivate_adapter("adapter", offload="cpu"),
    )
    for attempt in attempts:
        try:
            attempt()
            messages.append("ok")
        except ValueError as err:
            messages.append(f"refused: {err}")
    unchanged = list(model.active_adapters) == before
    model.set_active_adapters(before)
    return {"messages": messages, "active_unchanged": unchanged}


def run_lisa(folder: Path, rank: int, world: int, seed_offset: int) -> None:
    from peft_swift_ext.techniques.lisa import LisaConfig, LisaScheduler

    model = C.lisa_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=C.LR)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    lisa = LisaScheduler(model, LisaConfig(n_layers=1, interval=1, seed=seed_offset * rank), optimizer)
    inputs = C.shard_inputs(C.llama_inputs(batch=C.GLOBAL_BATCH), rank, world)
    drawn = []
    for _ in range(C.LISA_STEPS):
        lisa.step()
        drawn.append(list(lisa.active_layers))
        C.causal_lm_loss(ddp, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    all_weights = gather_objects(weights)
    info = {
        "drawn": gather_objects(drawn),
        "max_rank_diff": max((all_weights[0][k] - all_weights[1][k]).abs().max().item() for k in weights),
    }
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "weights.safetensors"))
        (folder / "info.json").write_text(json.dumps(info))


def run_galore(folder: Path, rank: int, world: int) -> None:
    from peft_swift_ext.techniques.galore import create_galore_optimizer

    model = C.galore_model()
    ddp = DistributedDataParallel(model)
    optimizer, _ = create_galore_optimizer(model, lr=C.GALORE_LR, **C.GALORE_OPTIONS)
    inputs = C.shard_inputs(C.llama_inputs(batch=C.GLOBAL_BATCH), rank, world)
    for _ in range(C.STEPS + 1):
        C.causal_lm_loss(ddp, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    projections = {}
    for index, param in enumerate(p for group in optimizer.param_groups if "rank" in group for p in group["params"]):
        projector = optimizer.state[param].get("projector")
        if projector is not None:
            projections[str(index)] = projector.ortho_matrix.detach().clone()
    all_projections = gather_objects(projections)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = {
        "projections": len(projections),
        "projections_agree": all(torch.equal(all_projections[0][k], all_projections[1][k]) for k in projections),
    }
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "weights.safetensors"))
        (folder / "info.json").write_text(json.dumps(info))


def run_neftune(folder: Path, engine: str, rank: int, world: int) -> None:
    case = C.NEFTUNE_CASE
    model = C.prepare_for_training(case.build())
    names = C.trainable_names(model)
    if engine == "ddp":
        # the noise itself, from the same embeddings on every rank, seeded per rank
        seed_per_rank(7)
        embedding = model.base_model.get_input_embeddings()
        ids = C.llama_inputs(batch=1)["input_ids"]
        with torch.no_grad():
            noise = embedding(ids) - embedding.get_base_layer()(ids)
        noises = gather_objects(noise)
        if rank == 0:
            save_file({f"rank{r}": n.contiguous() for r, n in enumerate(noises)}, str(folder / "noise.safetensors"))
    wrapped = wrap(model, engine)
    seed_per_rank(C.NEFTUNE_SEED)
    optimizer = torch.optim.SGD(C.trainable(model), lr=C.LR)
    inputs = C.shard_inputs(C.global_inputs(case), rank, world)
    for _ in range(C.STEPS):
        C.loss_of(case, wrapped, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    weights = {n: full(params[n]) for n in names}
    if rank == 0:
        save_file(weights, str(folder / "weights.safetensors"))


def run_engine(engine: str, root: Path, only: str | None, rank: int, world: int) -> None:
    """Every tuner case, then (unless ``only``) the techniques, under one engine."""
    cases = [c for c in C.TUNER_CASES if only is None or c.id in only.split(",")]
    for case in cases:
        folder = root / case.id
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run_tuner(case, engine, folder, rank, world)
        except Exception:  # recorded for the test to report; the other cases still run
            (folder / f"error{rank}.txt").write_text(traceback.format_exc())
        dist.barrier()
    jobs = {}
    if engine in ("ddp", "fsdp"):
        jobs["neftune"] = lambda f: run_neftune(f, engine, rank, world)
    if engine == "ddp":
        jobs["lisa"] = lambda f: run_lisa(f, rank, world, seed_offset=0)
        jobs["lisa-rank-seeded"] = lambda f: run_lisa(f, rank, world, seed_offset=1)
        jobs["galore"] = lambda f: run_galore(f, rank, world)
    if only is None:
        for name, job in jobs.items():
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            try:
                job(folder)
            except Exception:
                (folder / f"error{rank}.txt").write_text(traceback.format_exc())
            dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, help="comma-separated, run in this order: ddp,fsdp,zero2,zero3")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=None, help="comma-separated case ids (debugging)")
    args = parser.parse_args()
    engines = args.engine.split(",")
    unknown = set(engines) - {"ddp", "fsdp", "zero2", "zero3"}
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}")
    torch.set_num_threads(1)
    if any(engine.startswith("zero") for engine in engines):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # the default process group, which DDP and FSDP2 use as well
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for engine in engines:
        run_engine(engine, args.out / engine, args.only, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
