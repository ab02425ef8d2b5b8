"""Mixed-adapter batches through PEFT's LoRA layers and ``modules_to_save`` copies, in one pass.

PEFT's own path (``adapter_names=`` on a LoRA ``PeftModel``) runs one sub-batch per adapter. Here every LoRA
``Linear`` layer computes its base output once and adds, to each row, that row's own adapter's ``B·A·x·scaling``
with the adapters' weights stacked and gathered per row (:func:`peft_swift_ext.core.rows.per_row`). Layers this
cannot express (DoRA, embeddings, convolutions) take PEFT's own per-adapter path; ``modules_to_save`` copies
(LongLoRA's embeddings and norms) run each row through its adapter's copy.

The hooks doing this are installed once per layer and act only inside a mixed batch of the calling thread or task
(:func:`peft_swift_ext.core.rows.current_rows`), so concurrent calls never see each other's rows.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from ..compat import ModulesToSaveWrapper
from .rows import BASE, RowPlan, current_rows, per_row, plan_rows, split_plan, structure_key

_HOOKED = "_peft_swift_ext_row_hooks"


class _LoraDelta(nn.Module):
    """One adapter's ``B(A(x)) * scaling`` as a module (its own layers; the scaling as a buffer so it is stacked)."""

    def __init__(self, lora_a: nn.Module, lora_b: nn.Module, scaling: float) -> None:
        super().__init__()
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.register_buffer("scaling", lora_a.weight.new_tensor(float(scaling)), persistent=False)

    def forward(self, x):
        return self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype))) * self.scaling


def install_row_hooks(model: nn.Module) -> None:
    """Give every LoRA layer and ``modules_to_save`` wrapper of ``model`` its mixed-batch hooks (once each).

    Args:
        model: the model holding the layers.
    """
    for module in model.modules():
        if module.__dict__.get(_HOOKED):
            continue
        if isinstance(module, LoraLayer) and type(module).__module__.startswith("peft.tuners.lora"):
            # LoRA's own layers (not AdaLoRA's and other subclasses, whose forward takes no adapter_names)
            module.register_forward_pre_hook(_lora_names, with_kwargs=True)
            module.register_forward_hook(_lora_rows, with_kwargs=True)
        elif isinstance(module, ModulesToSaveWrapper):
            module.register_forward_hook(_copies_rows, with_kwargs=True)
        else:
            continue
        module.__dict__[_HOOKED] = True


def _held(layer: LoraLayer) -> set[str]:
    return set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))


def _batched(layer: LoraLayer, rows: tuple[str, ...]) -> bool:
    named = _held(layer) & set(rows)
    return type(layer) is LoraLinear and not any(layer.use_dora.get(name, False) for name in named)


def _lora_names(layer: LoraLayer, args: tuple, kwargs: dict):
    # PEFT's LoRA layers take per-row names as their forward's ``adapter_names``: all "__base__" where this module
    # adds the rows' adapters itself (after the call), each row's own name where PEFT's per-adapter path runs
    rows = current_rows()
    if rows is None:
        return None
    held = _held(layer)
    names = [BASE] * len(rows) if _batched(layer, rows) else [name if name in held else BASE for name in rows]
    return args, {**kwargs, "adapter_names": names}


def _lora_rows(layer: LoraLayer, args: tuple, kwargs: dict, output):
    rows = current_rows()
    if rows is None or not _batched(layer, rows):
        return None
    x = args[0]
    plan = plan_rows(rows, layer.lora_A, x.shape[0], "a LoRA layer")
    if not plan:
        return output
    biased = getattr(layer, "lora_bias", {})  # peft >= 0.14: a trainable bias on lora_B
    if any(biased.get(name, False) for name in plan.adapters):
        return _lora_rows_per_module(layer, plan, x, output)
    for group in split_plan(plan, lambda name: (layer.lora_A[name].weight.shape, layer.lora_B[name].weight.shape)):
        every_row = group.rows.shape[0] == x.shape[0]  # rows are listed in order, so all of them is the identity
        delta = _stacked_lora_delta(layer, group, x if every_row else x[group.rows]).to(output.dtype)
        output = output + delta if every_row else output.index_add(0, group.rows.to(output.device), delta)
    return output


def _stacked_lora_delta(layer: LoraLayer, group: RowPlan, x: torch.Tensor) -> torch.Tensor:
    """``scaling_k · B_k A_k x`` for each row, with ``k`` the row's adapter: two batched matrix products, each row
    multiplied by its own adapter's matrices (gathered per row: ``r`` is small, so this copies far less than
    grouping the rows' inputs by adapter would)."""
    names = group.adapters
    index = group.index.to(x.device)
    weight_a = torch.stack([layer.lora_A[name].weight for name in names])[index]  # (rows, r, in)
    weight_b = torch.stack([layer.lora_B[name].weight for name in names])[index]  # (rows, out, r)
    scaling = weight_a.new_tensor([float(layer.scaling[name]) for name in names])[index]
    flat = x.to(weight_a.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
    delta = torch.bmm(torch.bmm(flat, weight_a.transpose(1, 2)), weight_b.transpose(1, 2))
    delta = delta * scaling[:, None, None]
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _lora_rows_per_module(layer: LoraLayer, plan: RowPlan, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Adapters with a bias on ``lora_B``: each adapter's ``B(A(x))`` as a module through :func:`per_row`."""

    def key(name: str):
        return structure_key(layer.lora_A[name]) + structure_key(layer.lora_B[name])

    for group in split_plan(plan, key):
        deltas = [_LoraDelta(layer.lora_A[n], layer.lora_B[n], layer.scaling[n]) for n in group.adapters]
        output = output.clone()
        output[group.rows] += per_row(deltas, group.index, x[group.rows]).to(output.dtype)
    return output


def _copies_rows(wrapper: ModulesToSaveWrapper, args: tuple, kwargs: dict, output):
    # Whatever the wrapper computed, each row gets the original module's output or its own adapter's copy's.
    rows = current_rows()
    if rows is None:
        return None
    x = args[0]
    plan = plan_rows(rows, wrapper.modules_to_save, x.shape[0], "a modules_to_save copy")
    result = wrapper.original_module(*args, **kwargs)
    for group in split_plan(plan, lambda name: structure_key(wrapper.modules_to_save[name])):
        copies = [wrapper.modules_to_save[name] for name in group.adapters]
        result = result.clone()
        result[group.rows] = per_row(copies, group.index, x[group.rows]).to(result.dtype)
    return result
