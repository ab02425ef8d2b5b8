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

from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from ..compat import ModulesToSaveWrapper
from .rows import BASE, current_rows, per_row, plan_rows, split_plan, structure_key

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
