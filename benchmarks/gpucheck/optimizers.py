"""GaLore 32-bit and 8-bit (galore-torch through create_galore_optimizer) and Q-GaLore (this package) on the device.

Every run trains the same seeded Llama (all weights, the seven projections of each layer projected) on one fixed
batch, so the loss must fall, and is compared with a run computed another way: 32-bit GaLore and Q-GaLore with the
same steps on the CPU, 8-bit GaLore with 32-bit GaLore on the device.

A singular vector's sign is arbitrary, and LAPACK (CPU) and cuSOLVER (CUDA) choose differently. GaLore's update is
not invariant to that choice: Adam's moments survive a projection refresh in the old basis, and Q-GaLore quantises
the projection in groups that span several singular vectors. So the comparisons run with ``canonical_svd_signs``
(each singular pair's sign fixed by a seeded vector, on both devices); the rows also record, unchecked, how far
the trajectories part with each library's own signs.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from peft_swift_ext.techniques import (
    QGaLoreAdamW,
    create_galore_optimizer,
    quantize_linear_weights,
    select_galore_parameters,
)
from peft_swift_ext.techniques.qgalore.int8_linear import Int8WeightLinear

from . import models
from .common import (
    NEEDS_CUDA,
    Metric,
    Row,
    guarded,
    is_cuda,
    max_relative_step_error,
    measure_cost,
    ratio,
    relative_error,
    release,
    tensor_bytes,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-3
EPS = 1e-8  # galore-torch's 32-bit AdamW defaults to 1e-6, bitsandbytes' to 1e-8: one value for both


@contextlib.contextmanager
def canonical_svd_signs(seed: int = 11):
    """``torch.linalg.svd`` with each singular pair's sign chosen so that ``wᵀu > 0`` for a fixed random ``w``.

    Flipping ``u_i`` and ``v_i`` together leaves an SVD valid, so this picks one of the valid answers, the same one
    on every device (up to rounding). Used by galore-torch's projector and QGaLoreProjector alike.
    """
    original = torch.linalg.svd

    def svd(matrix, *args, **kwargs):
        u, s, vh = original(matrix, *args, **kwargs)
        w = torch.randn(u.shape[-2], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        signs = torch.sign(w.to(u.device, u.dtype) @ u)
        signs[signs == 0] = 1
        return torch.return_types.linalg_svd((u * signs, s, vh * signs[:, None]))

    torch.linalg.svd = svd
    try:
        yield
    finally:
        torch.linalg.svd = original


def galore_state_bytes(optimizer) -> int:
    """Bytes of every tensor in galore-torch's optimizer state, projection matrices included."""
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif hasattr(value, "ortho_matrix"):
                tensors.append(value.ortho_matrix)
    return tensor_bytes(tensors)


def make_optimizer(variant: str, model, rank: int, gap: int):
    """The optimizer of one variant; ``qgalore-int8`` first swaps the projected layers for INT8 ones."""
    if variant in ("galore", "galore8"):
        optim = "adamw8bit" if variant == "galore8" else "adamw"
        optimizer, _ = create_galore_optimizer(
            model, target_modules=TARGETS, rank=rank, update_proj_gap=gap, optim=optim, lr=LR, eps=EPS
        )
        return optimizer
    int8 = variant == "qgalore-int8"
    if int8:
        projected = quantize_linear_weights(model, TARGETS, group_size=256)
    else:
        projected = select_galore_parameters(model, TARGETS)
    ids = {id(p) for p in projected}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": others}, {"params": projected, "rank": rank, "update_proj_gap": gap, "proj_type": "std"}]
    return QGaLoreAdamW(groups, lr=LR, eps=EPS, proj_bits=4, moment_dtype=torch.bfloat16)


def state_bytes(variant: str, optimizer) -> int:
    return optimizer.state_nbytes() if variant.startswith("qgalore") else galore_state_bytes(optimizer)


def projected_state_bytes(variant: str, optimizer) -> int:
    """State bytes of the projected matrices only (the embeddings, head and norms keep full moments everywhere)."""
    projected = [p for group in optimizer.param_groups if "rank" in group for p in group["params"]]
    if variant.startswith("qgalore"):
        total = 0
        for param in projected:
            state = optimizer.state.get(param, {})
            total += tensor_bytes([state.get("exp_avg"), state.get("exp_avg_sq")])
            total += state["projector"].state_nbytes() if "projector" in state else 0
        return total
    tensors = []
    for param in projected:
        for value in optimizer.state.get(param, {}).values():
            tensors.append(value.ortho_matrix if hasattr(value, "ortho_matrix") else value)
    return tensor_bytes(tensors)


def projected_weights(model) -> dict[str, torch.Tensor]:
    """The projected matrices as float32 on the CPU (INT8 layers dequantised)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8WeightLinear):
            out[name] = module.dequantized_weight(torch.float32).cpu()
        elif isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            out[name] = module.weight.detach().float().cpu().clone()
    return out


def train(
    initial, variant: str, device, size: dict, steps: int, rank: int, gap: int, seed: int = 0, canonical: bool = True
) -> dict:
    """``steps`` steps of one variant from a copy of ``initial`` on ``device`` (SVD signs canonical unless told)."""
    with canonical_svd_signs() if canonical else contextlib.nullcontext():
        return _train(initial, variant, device, size, steps, rank, gap, seed)


def _train(initial, variant: str, device, size: dict, steps: int, rank: int, gap: int, seed: int) -> dict:
    model = copy.deepcopy(initial).to(device)
    optimizer = make_optimizer(variant, model, rank, gap)
    start = projected_weights(model)
    batch = models.batch("llama", size, device)
    torch.manual_seed(seed)  # Q-GaLore's stochastic rounding of INT8 weights draws from the device's generator
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    eight_bit = sum(1 for s in optimizer.state.values() if getattr(s.get("state1"), "dtype", None) == torch.uint8)
    result = {
        "losses": losses, "start": start, "end": projected_weights(model), "state": state_bytes(variant, optimizer),
        "projected_state": projected_state_bytes(variant, optimizer),
        "weights": tensor_bytes(list(model.parameters()) + list(model.buffers())), "eight_bit_states": eight_bit,
    }  # fmt: skip
    del model, optimizer
    release(device)
    return result


def update_error(run: dict, reference: dict) -> float:
    """‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ over all projected weights, each ΔW from its own run's start."""
    delta = torch.cat([(run["end"][n] - run["start"][n]).flatten() for n in run["start"]])
    delta_ref = torch.cat([(reference["end"][n] - reference["start"][n]).flatten() for n in reference["start"]])
    return relative_error(delta, delta_ref)


def weight_distance(a: dict, b: dict) -> float:
    return torch.cat([(a["end"][n] - b["end"][n]).flatten() for n in a["end"]]).norm().item()


def step_cost(initial, variant: str, device, size: dict, rank: int, gap: int, warmup: int, repeats: int):
    release(device)
    baseline = torch.cuda.memory_allocated() if is_cuda(device) else 0
    model = copy.deepcopy(initial).to(device)
    optimizer = make_optimizer(variant, model, rank, gap)
    batch = models.batch("llama", size, device)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def resident():
        return tensor_bytes(list(model.parameters()) + list(model.buffers())) + state_bytes(variant, optimizer)

    # The model and optimizer go with this frame; the next configuration's release() frees their memory.
    with canonical_svd_signs():
        return measure_cost(step, device, warmup, repeats, baseline, resident)


def falls(losses: list[float]) -> Metric:
    return Metric("loss falls (last/first - 1)", losses[-1] / losses[0] - 1, 0.0)


def optimizer_rows(device, size: dict, steps: int, rank: int, gap: int, warmup: int, repeats: int, log) -> list[Row]:
    """GaLore 32-bit, GaLore 8-bit, Q-GaLore (float and INT8 weights); ratios against 32-bit GaLore."""
    initial = models.build("llama", size)  # on the CPU: every run starts from a copy of the same weights
    runs: dict[str, dict] = {}
    what = {
        "galore": f"GaLore AdamW 32-bit (galore-torch) via create_galore_optimizer, rank {rank}, SVD every {gap}",
        "galore8": f"GaLore AdamW 8-bit (bitsandbytes) via create_galore_optimizer, rank {rank}",
        "qgalore": f"QGaLoreAdamW: INT4 projection, bf16 moments, float32 weights, rank {rank}",
        "qgalore-int8": f"Q-GaLore: INT8 weights (stochastic rounding), INT4 projection, bf16 moments, rank {rank}",
    }
    checks = {"galore": "galore-adamw", "galore8": "galore-adamw8bit", "qgalore": "qgalore"}
    checks["qgalore-int8"] = "qgalore-int8"
    ref = f"the same {steps} steps on the CPU (float32), same weights"

    def galore32():
        runs["galore"] = dev = train(initial, "galore", device, size, steps, rank, gap)
        cpu = train(initial, "galore", "cpu", size, steps, rank, gap)
        metrics = [
            # float32 on both sides with the same SVD signs: the same function, but float32 singular vectors are
            # accurate only to about eps / (relative singular gap), and Adam's per-coordinate normalisation
            # amplifies that in the weights (a one-ulp change of the start moves them by ~3e-4 on the CPU; see
            # details). A wrong projection, moment or update would move them by O(1).
            Metric("loss", max_relative_step_error(dev["losses"], cpu["losses"]), 1e-4),
            Metric("weight update", update_error(dev, cpu), 1e-2),
            falls(dev["losses"]),
        ]
        details = {**_details(dev, cpu), **native_signs("galore"), **one_ulp_sensitivity("galore", cpu)}
        return [Row("galore-adamw", what["galore"], ref, metrics, details=details)]

    def galore8():
        if not is_cuda(device):
            return [Row("galore-adamw8bit", what["galore8"], status=NEEDS_CUDA)]
        runs["galore8"] = dev = train(initial, "galore8", device, size, steps, rank, gap)
        thirty_two = runs["galore"]
        metrics = [
            # Blockwise 8-bit moments err by about 1% per update; over a few steps the loss stays within 2%.
            Metric("loss vs 32-bit", max_relative_step_error(dev["losses"], thirty_two["losses"]), 2e-2),
            Metric("8-bit states in use (count>0)", 0.0 if dev["eight_bit_states"] else 1.0, 0.0),
            falls(dev["losses"]),
        ]
        reference = "32-bit GaLore on the same device, same weights and steps"
        details = {
            **_details(dev, thirty_two), "params_with_8bit_states": dev["eight_bit_states"],
            # Not checked: Adam normalises every coordinate, so 8-bit moments move small coordinates' updates a lot.
            "weight_update_error_vs_32bit": update_error(dev, thirty_two),
        }  # fmt: skip
        return [Row("galore-adamw8bit", what["galore8"], reference, metrics, details=details)]

    def qgalore():
        runs["qgalore"] = dev = train(initial, "qgalore", device, size, steps, rank, gap)
        cpu = train(initial, "qgalore", "cpu", size, steps, rank, gap)
        metrics = [
            # Rounding the projection to INT4 (nearest) and the moments to bf16 turns float32 differences of the
            # SVD into whole quantisation steps: a one-ulp change of the start moves the weights by ~2% on the CPU
            # (see details). A wrong quantisation, projection or update would move them by O(1).
            Metric("loss", max_relative_step_error(dev["losses"], cpu["losses"]), 5e-3),
            Metric("weight update", update_error(dev, cpu), 0.25),
            falls(dev["losses"]),
        ]
        details = {**_details(dev, cpu), **native_signs("qgalore"), **one_ulp_sensitivity("qgalore", cpu)}
        return [Row("qgalore", what["qgalore"], ref, metrics, details=details)]

    def qgalore_int8():
        runs["qgalore-int8"] = dev = train(initial, "qgalore-int8", device, size, steps, rank, gap, seed=0)
        cpu = train(initial, "qgalore-int8", "cpu", size, steps, rank, gap, seed=0)
        other = train(initial, "qgalore-int8", "cpu", size, steps, rank, gap, seed=1)
        # Stochastic rounding draws differ between devices as between seeds: the distance between two CPU runs
        # with different seeds is the noise floor that the device-to-CPU distance is held against.
        noise = weight_distance(other, cpu)
        metrics = [
            Metric("weight distance / seed noise", weight_distance(dev, cpu) / max(noise, 1e-30), 1.5),
            # A sanity bound: rounding noise moves this loss by well under 1%; a broken path would not.
            Metric("loss", max_relative_step_error(dev["losses"], cpu["losses"]), 2e-2),
            falls(dev["losses"]),
        ]
        details = {
            **_details(dev, cpu), "cpu_other_seed_losses": other["losses"], "seed_noise": noise,
            "model_weight_mib": dev["weights"] / 2**20,
        }  # fmt: skip
        reference = f"{ref}; a second CPU run with another rounding seed gives the noise floor"
        return [Row("qgalore-int8", what["qgalore-int8"], reference, metrics, details=details)]

    def native_signs(variant: str) -> dict:
        """How far the trajectories part when each library keeps its own SVD signs (recorded, not checked)."""
        dev_native = train(initial, variant, device, size, steps, rank, gap, canonical=False)
        cpu_native = train(initial, variant, "cpu", size, steps, rank, gap, canonical=False)
        return {
            "native_svd_signs_loss_error": max_relative_step_error(dev_native["losses"], cpu_native["losses"]),
            "native_svd_signs_weight_update_error": update_error(dev_native, cpu_native),
        }

    def one_ulp_sensitivity(variant: str, cpu: dict) -> dict:
        """How far the CPU run moves when every initial weight changes by about one float32 ulp (recorded)."""
        perturbed = copy.deepcopy(initial)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in perturbed.parameters():
                param.mul_(1 + 2.0**-24 * torch.randn(param.shape, generator=generator))
        moved = train(perturbed, variant, "cpu", size, steps, rank, gap)
        return {
            "one_ulp_start_loss_error": max_relative_step_error(moved["losses"], cpu["losses"]),
            "one_ulp_start_weight_update_error": update_error(moved, cpu),
        }

    rows = []
    for key, fn in (("galore", galore32), ("galore8", galore8), ("qgalore", qgalore), ("qgalore-int8", qgalore_int8)):
        new = guarded(checks[key], what[key], fn)
        rows += new
        log(new)

    def costs():
        spent = {k: step_cost(initial, k, device, size, rank, gap, warmup, repeats) for k in runs}
        keys = {check: key for key, check in checks.items()}
        for row in rows:
            key = keys.get(row.check)
            if key in spent:
                row.step_ratio = ratio(spent[key].step_s, spent["galore"].step_s)
                row.memory_ratio = ratio(runs[key]["state"], runs["galore"]["state"])
                row.ratio_reference = "32-bit GaLore: step time; optimizer-state bytes"
                row.details["bench"] = spent[key].to_json()
                row.details["peak_ratio_vs_galore32"] = ratio(spent[key].peak_bytes, spent["galore"].peak_bytes)
                projected = ratio(runs[key]["projected_state"], runs["galore"]["projected_state"])
                row.details["projected_state_ratio_vs_galore32"] = projected
        return []

    if "galore" in runs:
        for row in guarded("optimizer-costs", "GaLore / Q-GaLore step cost", costs):
            rows.append(row)
    return rows


def _details(run: dict, reference: dict) -> dict:
    return {
        "losses": run["losses"], "reference_losses": reference["losses"], "state_mib": run["state"] / 2**20,
        "reference_state_mib": reference["state"] / 2**20,
    }  # fmt: skip
