"""Optimizer-state memory and step time: AdamW vs GaLore (galore-torch) vs Q-GaLore (this package), rank 64.

State memory is counted exactly: the bytes of every tensor the optimizer keeps (moments, projection matrices
as stored). Step times are medians over steps without an SVD; SVD refresh steps are reported separately.
Run: python benchmarks/techniques/bench_galore.py
"""

import time

import torch
from _measure import write_result
from galore_torch import GaLoreAdamW

from peft_swift_ext.techniques.qgalore import QGaLoreAdamW, QGaLoreProjector

SHAPES = [(1024, 1024), (2048, 2048)]
RANK, GAP, STEPS = 64, 5, 13


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, QGaLoreProjector):
                total += value.state_nbytes()
            elif hasattr(value, "ortho_matrix"):  # galore-torch's projector
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


def run(make_optimizer, shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape) * 0.02)
    optimizer = make_optimizer([{"params": [weight], "rank": RANK, "update_proj_gap": GAP, "scale": 1.0,
                                 "proj_type": "std"}])  # fmt: skip
    # A slowly drifting low-rank-plus-noise gradient, like a real layer's, so the lazy SVD rule can act.
    base = torch.randn(shape[0], 8) @ torch.randn(8, shape[1])
    times = []
    for step in range(STEPS):
        weight.grad = base + 0.1 * torch.randn(shape) + 0.01 * step * torch.randn(shape[0], 1)
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    svd_steps = [s for s in range(STEPS) if s % GAP == 0]
    plain = sorted(t for s, t in enumerate(times) if s not in svd_steps)
    return {
        "state_bytes": state_bytes(optimizer),
        "step_s": plain[len(plain) // 2],
        "svd_step_s": sum(times[s] for s in svd_steps) / len(svd_steps),
    }


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3, foreach=False),
    "galore": lambda groups: GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True),
    "qgalore": lambda groups: QGaLoreAdamW(groups, lr=1e-3, proj_bits=4, moment_dtype=torch.bfloat16),
}


def main():
    results = {}
    for shape in SHAPES:
        runs = {name: run(make, shape) for name, make in OPTIMIZERS.items()}
        adamw, galore, qgalore = runs["adamw"], runs["galore"], runs["qgalore"]
        results[f"{shape[0]}x{shape[1]}"] = {
            **{f"{name}_state_mib": r["state_bytes"] / 2**20 for name, r in runs.items()},
            "galore_vs_adamw_state": galore["state_bytes"] / adamw["state_bytes"],
            "qgalore_vs_galore_state": qgalore["state_bytes"] / galore["state_bytes"],
            **{f"{name}_step_ms": r["step_s"] * 1e3 for name, r in runs.items()},
            **{f"{name}_svd_step_ms": r["svd_step_s"] * 1e3 for name, r in runs.items() if name != "adamw"},
        }
    write_result(
        "galore",
        {"rank": RANK, "update_proj_gap": GAP, "targets": {"galore_vs_adamw_state": 0.2,
                                                          "qgalore_vs_galore_state": 0.5}, "shapes": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
