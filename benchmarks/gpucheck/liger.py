"""Liger Kernel on the device: loss and gradients against the unpatched model, its cost, and its undo."""

from __future__ import annotations

import copy
import inspect
import os

import torch

from peft_swift_ext.techniques import apply_liger_kernel

from . import models
from .common import NEEDS_CUDA, Metric, Row, guarded, is_cuda, measure_cost, ratio, relative_error, release

WHAT = "Liger kernels (apply_liger_kernel) on a Llama: float32 loss and every gradient; bf16 cost"
WHAT_UNDO = "LigerPatch.undo(): every patched module, class and instance attribute back; same loss"


def liger_owners(model) -> list:
    """What liger-kernel may rebind for Llama, listed here independently of the package's own snapshot."""
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama

    module = modeling_llama.__name__
    classes = [v for v in vars(modeling_llama).values() if inspect.isclass(v) and v.__module__ == module]
    return [torch.nn.functional, modeling_llama, loss_utils, *classes, *model.modules()]


def attribute_snapshot(owners) -> list[tuple[object, dict]]:
    return [(owner, dict(vars(owner))) for owner in owners]


def changed_attributes(snapshot) -> list[str]:
    """Attributes added, removed or rebound since ``snapshot`` (compared by identity)."""
    changed = []
    for owner, before in snapshot:
        now = vars(owner)
        name = getattr(owner, "__name__", type(owner).__name__)
        for key in sorted(set(before) | set(now)):
            if key not in now or key not in before or now[key] is not before[key]:
                changed.append(f"{name}.{key}")
    return changed


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def liger_rows(device, check_size: dict, bench_size: dict, warmup: int, repeats: int) -> list[Row]:
    """Rows ``liger-llama`` (correctness and cost ratio vs unpatched) and ``liger-undo``."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not is_cuda(device) and not interpreted:
        return [Row("liger-llama", WHAT, status=NEEDS_CUDA), Row("liger-undo", WHAT_UNDO, status=NEEDS_CUDA)]
    # Under Triton's CPU interpreter only these kernels run: a development aid for this script, not a figure.
    options = {} if is_cuda(device) else {"rope": True, "fused_linear_cross_entropy": True}
    found: dict[str, object] = {}

    def correctness():
        with torch.device(device):
            model = models.build("llama", check_size)
        reference = copy.deepcopy(model)
        batch = models.batch("llama", check_size, device)
        ref_loss, ref_grads = loss_and_grads(reference, batch)
        snapshot = attribute_snapshot(liger_owners(model))
        patch = apply_liger_kernel(model, **options)
        patched = changed_attributes(snapshot)
        loss, grads = loss_and_grads(model, batch)
        patch.undo()
        left_over = changed_attributes(snapshot)
        loss_after_undo, _ = loss_and_grads(model, batch)
        errors = {n: relative_error(grads[n], g) if n in grads else float("inf") for n, g in ref_grads.items()}
        worst = max(errors, key=errors.get)
        found["kernels"] = dict(patch.options) or "liger-kernel's defaults for llama"
        main = Row(
            "liger-llama", WHAT, "the same weights unpatched, float32", [
                Metric("loss", abs(loss - ref_loss) / abs(ref_loss), 1e-5),
                # float32 kernels against float32 torch: far under 1e-3 (METHOD.md); the worst tensor counts.
                Metric("worst grad tensor", errors[worst], 1e-4),
            ],
            details={"worst_tensor": worst, "kernels": found["kernels"], "patched_attributes": len(patched)},
        )  # fmt: skip
        undo = Row(
            "liger-undo", WHAT_UNDO, "attributes before apply_liger_kernel (by identity); the unpatched loss", [
                Metric("attributes not restored", float(len(left_over)), 0.0),
                Metric("patch changed something (0 = yes)", 0.0 if patched else 1.0, 0.0),
                Metric("loss after undo", abs(loss_after_undo - ref_loss) / abs(ref_loss), 1e-6),
            ],
            details={"not_restored": left_over[:20], "patched": patched[:60]},
        )  # fmt: skip
        del model, reference
        release(device)
        return [main, undo]

    def cost(main: Row):
        # bf16 as Liger is used; float32 under the interpreter, where bf16 kernels are not the point.
        dtype = torch.bfloat16 if is_cuda(device) else torch.float32
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        batch = models.batch("llama", bench_size, device)
        spent, losses = {}, {}
        for patched in (False, True):
            release(device)
            baseline = torch.cuda.memory_allocated() if is_cuda(device) else 0
            with torch.device(device):
                model = models.build("llama", bench_size).to(dtype)
            patch = apply_liger_kernel(model, **options) if patched else None
            try:
                losses[patched] = model(**batch).loss.item()

                def step(model=model):
                    model.zero_grad(set_to_none=True)
                    model(**batch).loss.backward()

                spent[patched] = measure_cost(step, device, warmup, repeats, baseline)
            finally:
                if patch is not None:
                    patch.undo()
            del model
        release(device)
        # Both sides round to bf16 at different points; 2e-2 is the tuners' bf16 loss bound too.
        main.metrics.append(
            Metric(f"{name} loss, bench size", abs(losses[True] - losses[False]) / abs(losses[False]), 2e-2)
        )
        main.step_ratio = ratio(spent[True].step_s, spent[False].step_s)
        main.memory_ratio = ratio(spent[True].peak_bytes, spent[False].peak_bytes)
        main.ratio_reference = f"unpatched Llama, {name} forward+backward"
        main.details["bench"] = {"liger": spent[True].to_json(), "unpatched": spent[False].to_json()}
        main.details["bench_losses"] = {"liger": losses[True], "unpatched": losses[False]}
        return [main]

    rows = guarded("liger-llama", WHAT, correctness)
    if len(rows) == 2:
        main, undo = rows
        main.status = ""  # decided again once the cost's loss check is in
        costed = guarded("liger-llama", WHAT, lambda: cost(main))[0]
        if costed is not main:  # the cost run failed: keep the correctness figures, report the error
            main.status = costed.status
            main.details["traceback"] = costed.details.get("traceback")
        return [main, undo]
    return rows + [Row("liger-undo", WHAT_UNDO, status="error: the correctness run failed first").finish()]
