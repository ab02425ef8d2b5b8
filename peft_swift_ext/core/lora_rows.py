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

from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import ModulesToSaveWrapper, wrap_active_adapters
from .rows import BASE, RowPlan, current_rows, per_row, plan_rows, rows_state, split_plan, structure_key
from .scope import ScopedActiveAdapters, ScopedAdapters

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
    """Give every LoRA layer and ``modules_to_save`` wrapper of ``model`` its mixed-batch hooks (once each)."""
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


@dataclass(frozen=True)
class _LayerRows:
    """What one LoRA layer does in one mixed-batch call, worked out at its first step and reused at every later
    one (a ``generate`` calls each layer once per token; the adapters cannot change during an inference call).

    ``batched``: the layer adds the rows' adapters itself (else PEFT's per-adapter path runs them, given ``names`` as
    its ``adapter_names``); ``groups``: ``(rows, every_row, A, B, scaling)`` per group of same-shaped adapters, the
    matrices gathered per row, or with ``per_module`` (a bias on ``lora_B``) the plan for :func:`per_row`.
    """

    batched: bool
    names: list[str]
    groups: tuple = ()
    per_module: bool = False


def _layer_rows(layer: LoraLayer, rows: tuple[str, ...]) -> _LayerRows:
    memo = rows_state().setdefault("lora_layers", {})
    found = memo.get(id(layer))  # the layer lives through the call (the structure lock), so its id is stable
    if found is None:
        found = memo[id(layer)] = _plan_layer(layer, rows)
    return found


def _plan_layer(layer: LoraLayer, rows: tuple[str, ...]) -> _LayerRows:
    held = set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))
    named = held & set(rows)
    batched = type(layer) is LoraLinear and not any(layer.use_dora.get(name, False) for name in named)
    if not batched:
        return _LayerRows(False, [name if name in held else BASE for name in rows])
    plan = plan_rows(rows, layer.lora_A, len(rows), "a LoRA layer")
    biased = getattr(layer, "lora_bias", {})  # peft >= 0.14: a trainable bias on lora_B
    if any(biased.get(name, False) for name in plan.adapters):
        return _LayerRows(True, [BASE] * len(rows), (plan,), per_module=True)
    groups = []
    for group in split_plan(plan, lambda name: (layer.lora_A[name].weight.shape, layer.lora_B[name].weight.shape)):
        names = group.adapters
        weight_a = torch.stack([layer.lora_A[name].weight for name in names])[group.index]  # (rows, r, in)
        weight_b = torch.stack([layer.lora_B[name].weight for name in names])[group.index]  # (rows, out, r)
        scaling = weight_a.new_tensor([float(layer.scaling[name]) for name in names])[group.index]
        every_row = group.rows.shape[0] == len(rows)  # rows are listed in order, so all of them is the identity
        groups.append((group.rows.to(weight_a.device), every_row, weight_a, weight_b, scaling))
    return _LayerRows(True, [BASE] * len(rows), tuple(groups))


def _lora_names(layer: LoraLayer, args: tuple, kwargs: dict):
    # PEFT's LoRA layers take per-row names as their forward's ``adapter_names``: all "__base__" where this module
    # adds the rows' adapters itself (after the call), each row's own name where PEFT's per-adapter path runs
    rows = current_rows()
    if rows is None:
        return None
    return args, {**kwargs, "adapter_names": _layer_rows(layer, rows).names}


def _lora_rows(layer: LoraLayer, args: tuple, kwargs: dict, output):
    rows = current_rows()
    if rows is None:
        return None
    x = args[0]
    if x.shape[0] != len(rows):
        raise ValueError(f"adapter_names has {len(rows)} entries but a LoRA layer received {x.shape[0]} rows")
    work = _layer_rows(layer, rows)
    if not work.batched:
        return None
    if work.per_module:
        return _lora_rows_per_module(layer, work.groups[0], x, output)
    for rows_of_group, every_row, weight_a, weight_b, scaling in work.groups:
        # scaling_k · B_k A_k x for each row: two batched products with the row's own matrices (gathered per row:
        # r is small, so this copies far less than grouping the rows' inputs by adapter would)
        part = x if every_row else x[rows_of_group]
        flat = part.to(weight_a.dtype).reshape(part.shape[0], -1, part.shape[-1])  # (rows, tokens, in)
        delta = torch.bmm(torch.bmm(flat, weight_a.transpose(1, 2)), weight_b.transpose(1, 2)) * scaling[:, None, None]
        delta = delta.reshape(*part.shape[:-1], delta.shape[-1]).to(output.dtype)
        output = output + delta if every_row else output.index_add(0, rows_of_group, delta)
    return output


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


class ScopedLoraAdapters(ScopedAdapters):
    """:class:`ScopedAdapters` for tuners whose layers are PEFT's own (LoRA+, LongLoRA): before a scope opens,
    every tuner layer and ``modules_to_save`` wrapper of the model gets a :class:`ScopedActiveAdapters` list in place
    of its own (PEFT's ``set_adapter`` and ``add_adapter`` write plain lists again; the next scope puts views back).
    """

    def _prepare_scopes(self) -> None:
        token = self.scope_token

        def scoped_view(current):
            if isinstance(current, ScopedActiveAdapters) and current.token is token:
                return current
            return ScopedActiveAdapters(token, current)

        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                wrap_active_adapters(module, scoped_view)
