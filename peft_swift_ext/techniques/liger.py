"""Liger Kernel (Triton kernels for transformers models), applied to a model and undone again.

liger-kernel patches transformers at module level (classes and functions of `modeling_<arch>`, even
`torch.nn.functional.cross_entropy`) and rebinds methods on module instances. `apply_liger_kernel` records
everything those patches can touch first, so `LigerPatch.undo()` restores it exactly.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import torch
from torch import nn

from ..core.unwrap import unwrap_model

# Kernels that run under Triton's CPU interpreter (TRITON_INTERPRET=1); the others fail there.
INTERPRETER_KERNELS = ("rope", "cross_entropy", "fused_linear_cross_entropy")


class _AttributeSnapshot:
    """The attributes of one object (module, class or instance) as they were, to put back later."""

    def __init__(self, owner):
        self.owner = owner
        self.saved = dict(vars(owner))

    def restore(self) -> None:
        current = vars(self.owner)
        # a class's attribute dict is read-only; other owners' entries are written directly, bypassing
        # nn.Module's attribute routing
        for name in [n for n in current if n not in self.saved]:
            if isinstance(self.owner, type):
                delattr(self.owner, name)
            else:
                del current[name]
        for name, value in self.saved.items():
            if current.get(name, _MISSING) is not value:
                if isinstance(self.owner, type):
                    setattr(self.owner, name, value)
                else:
                    current[name] = value


_MISSING = object()


class LigerPatch:
    """Liger kernels applied to a model; `undo()` (or leaving the `with` block) removes them.

    Args:
        model: the plain model that was patched.
        options: the kernel switches passed to liger-kernel.
        snapshots: the recorded attributes of every module, class and instance the patches can touch.
    """

    def __init__(self, model: nn.Module, options: dict, snapshots: list[_AttributeSnapshot]):
        self.model, self.options, self._snapshots = model, options, snapshots
        self.active = True

    def undo(self) -> None:
        """Restore every transformers module, class and model instance liger-kernel changed."""
        if self.active:
            for snapshot in reversed(self._snapshots):
                snapshot.restore()
            self.active = False

    def __enter__(self) -> LigerPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def _resolve_options(apply_fn, options: dict, on_gpu: bool) -> dict:
    parameters = inspect.signature(apply_fn).parameters
    accepted = {name for name in parameters if name != "model"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{apply_fn.__name__} has no options {unknown}; it accepts {sorted(accepted)}")
    if on_gpu:
        return options
    # On the interpreter, kernels that cannot run there default to off, and asking for them is an error.
    unsupported = sorted(k for k, v in options.items() if v is True and k not in INTERPRETER_KERNELS)
    if unsupported:
        raise ValueError(
            f"kernels {unsupported} do not run under TRITON_INTERPRET=1; only {list(INTERPRETER_KERNELS)} do"
        )
    defaults = {n: False for n, p in parameters.items() if p.default is True and n not in INTERPRETER_KERNELS}
    return {**defaults, **options}


def _snapshots(model: nn.Module) -> list[_AttributeSnapshot]:
    owners = [torch.nn.functional]
    for name, module in list(sys.modules.items()):
        if module is None:
            continue
        if (name.startswith("transformers.") and ".modeling_" in name) or name == "transformers.loss.loss_utils":
            owners.append(module)
            owners += [v for v in vars(module).values() if inspect.isclass(v) and v.__module__ == name]
    owners += list(model.modules())
    return [_AttributeSnapshot(owner) for owner in owners]


def apply_liger_kernel(model: nn.Module, **options) -> LigerPatch:
    """Apply liger-kernel's kernels for the model's architecture, undoably.

    Needs a CUDA GPU, or Triton's CPU interpreter (`TRITON_INTERPRET=1`), where only the rope, cross-entropy and
    fused linear cross-entropy kernels run (the others then default to off).

    Args:
        model: a transformers model, `PeftModel` or `SwiftModel`; the wrapped model is patched.
        **options (bool): the switches of liger-kernel's `apply_liger_kernel_to_<arch>`, e.g. `rms_norm=False`,
            `fused_linear_cross_entropy=True`.

    Returns:
        A `LigerPatch`; call `undo()` or use it as a context manager.
    """
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    try:
        functions = importlib.import_module("liger_kernel.transformers.monkey_patch").MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        raise ImportError("apply_liger_kernel needs liger-kernel: pip install 'peft-swift-ext[liger]'") from err
    if model_type not in functions:
        raise ValueError(f"liger-kernel has no kernels for model type {model_type!r}; it covers {sorted(functions)}")
    on_gpu = torch.cuda.is_available() and any(p.is_cuda for p in base.parameters())
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "liger-kernel's Triton kernels need the model on a CUDA GPU; on CPU set TRITON_INTERPRET=1 (slow, "
            f"kernels {list(INTERPRETER_KERNELS)} only) or use causal_lm_chunked_loss for a memory-light loss"
        )
    apply_fn = functions[model_type]
    options = _resolve_options(apply_fn, options, on_gpu)
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    patch = LigerPatch(base, options, _snapshots(base))
    try:
        apply_fn(model=base, **options)
    except BaseException:
        patch.undo()
        raise
    return patch
