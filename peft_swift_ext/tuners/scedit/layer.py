"""SCEdit's SC-Tuner on one skip connection (or module output), in plain torch.

Math (ms-swift's SCEAdapter, per pixel over the C edited channels; ``W2``/``c2`` start at zero, so the
tuner starts as the identity):
    T(x)    = W2 GELU(W1 x + c1) + c2
    decoder: input [h, s] (channel split, s = the last ``dims`` channels) -> [h, s + T(s + hint)]
    encoder / identity: output o -> o + T(o + hint)
``hint`` is the hint module's output for the controllable variant (CSC-Tuner), zero otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer
from ...core.probes import FeatureProbes, ProbeSource
from ...core.rows import current_rows, per_row, plan_rows, split_plan, structure_key
from ...core.slots import ArgumentSlot, first_argument, first_tensor, replace_first_tensor


class SCEditLayer(SwiftTunerLayer):
    """A target module with, per adapter, an SC-Tuner on its skip input (decoder) or its output (encoder).

    Args:
        base_layer: the target module (a UNet up-block resnet in decoder mode).
    """

    adapter_layer_names = ("scedit_ln1", "scedit_ln2")
    other_param_names = ("scedit_mode", "scedit_dim")
    tuner_name = "SCEdit"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scedit_ln1 = nn.ModuleDict()
        self.scedit_ln2 = nn.ModuleDict()
        self.scedit_mode: dict[str, str] = {}
        self.scedit_dim: dict[str, int] = {}
        self.hinted: set[str] = set()
        self.probes = FeatureProbes(detach=False)
        self.layer_name = ""

    def update_layer(
        self, adapter_name: str, dim: int, hidden: int, mode: str, hint: ProbeSource | None, layer_name: str
    ) -> None:
        """Add one adapter.

        Args:
            adapter_name: its name.
            dim: the number of edited channels.
            hidden: the tuner's hidden width.
            mode: ``"decoder"``, ``"encoder"`` or ``"identity"``.
            hint: the module whose output is this target's hint, or None.
            layer_name: this layer's path in the model (for error messages).
        """
        down, up = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.scedit_ln1[adapter_name] = down
        self.scedit_ln2[adapter_name] = up
        self.scedit_mode[adapter_name] = mode
        self.scedit_dim[adapter_name] = dim
        self.layer_name = layer_name
        if hint is not None:
            self.hinted.add(adapter_name)
            self.probes.attach(adapter_name, [hint], self.capturing)
        move_adapter_to_base_device(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Unhook the adapter's hint probe, then delete its weights as PEFT does.

        Args:
            adapter_name: the adapter to delete.
        """
        self.hinted.discard(adapter_name)
        super().delete_adapter(adapter_name)

    def sc_tune(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x + T(x + hint)`` for one adapter; ``x`` is (B, C, H, W) or (B, tokens, C)."""
        hint = None
        if adapter_name in self.hinted:
            hint = self.probes.take(adapter_name, self.layer_name)[0]
            if hint.shape != x.shape:
                raise ValueError(
                    f"SCEditConfig.hint_modules: the hint for '{self.layer_name}' has shape {tuple(hint.shape)} but "
                    f"the features it conditions have shape {tuple(x.shape)}"
                )
        return self._tuner(adapter_name)(x, hint).to(x.dtype)

    def _skip_dim(self, adapter_name: str, x: torch.Tensor) -> int:
        """The adapter's skip channel count, checked against the decoder input ``x``."""
        dim = self.scedit_dim[adapter_name]
        if x.dim() != 4 or x.shape[1] <= dim:
            raise ValueError(
                f"SCEditConfig.dims: '{self.layer_name}' got input {tuple(x.shape)}, which has no {dim} skip channels "
                "after the hidden ones; decoder mode needs (batch, hidden + skip channels, height, width)"
            )
        return dim

    def _edit_skip(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        dim = self._skip_dim(adapter_name, x)
        hidden, skip = x.split([x.shape[1] - dim, dim], dim=1)
        return torch.cat([hidden, self.sc_tune(adapter_name, skip)], dim=1)

    def _edit_features(self, adapter_name: str, features: torch.Tensor) -> torch.Tensor:
        dim = self.scedit_dim[adapter_name]
        width = features.shape[1] if features.dim() == 4 else features.shape[-1]
        if width != dim:
            raise ValueError(
                f"SCEditConfig.dims: '{self.layer_name}' outputs {width} channels but the tuner was built for {dim}"
            )
        return self.sc_tune(adapter_name, features)

    def _tune_rows(self, x: torch.Tensor, rows: tuple[str, ...], names: list[str], skip: bool) -> torch.Tensor:
        """Each row of ``x`` through its own adapter's tuner, all rows in one pass; with ``skip`` (decoder mode) the
        tuners edit the last ``dims`` channels of ``x``, else all of it."""
        plan = plan_rows(rows, names, x.shape[0], self.layer_name)
        for group in split_plan(plan, lambda n: (self.scedit_dim[n], n in self.hinted, structure_key(self._tuner(n)))):
            first = group.adapters[0]
            start = x.shape[1] - self._skip_dim(first, x) if skip else 0
            edited = x[:, start:]
            hints = torch.zeros_like(edited[group.rows])
            if first in self.hinted:
                for k, name in enumerate(group.adapters):
                    chosen = group.index == k
                    hints[chosen] = self.probes.take(name, self.layer_name)[0][group.rows[chosen]].to(hints.dtype)
            tuned = per_row([self._tuner(n) for n in group.adapters], group.index, edited[group.rows], hints)
            x = x.clone()
            x[group.rows, start:] = tuned.to(x.dtype)
        return x

    def _tuner(self, adapter_name: str) -> nn.Module:
        return _SCTuner(self.scedit_ln1[adapter_name], self.scedit_ln2[adapter_name])

    def _tuned(self, x: torch.Tensor, names: list[str], rows: tuple[str, ...] | None, skip: bool) -> torch.Tensor:
        """``x`` through each adapter's tuner in turn, or in a mixed batch each row through its own adapter's."""
        if rows is not None:
            return self._tune_rows(x, rows, names, skip)
        for name in names:
            x = self._edit_skip(name, x) if skip else self._edit_features(name, x)
        return x

    def forward(self, *args, **kwargs):
        rows = current_rows()
        names = list(self.adapters_to_apply()) if rows is None else [n for n in self.scedit_ln1 if n in rows]
        decoder = [name for name in names if self.scedit_mode[name] == "decoder"]
        if decoder:
            x = self._tuned(first_argument(self.base_layer, args, kwargs), decoder, rows, skip=True)
            args, kwargs = ArgumentSlot(self.base_layer, 0).replace(args, kwargs, x)
        output = self.base_layer(*args, **kwargs)
        others = [name for name in names if self.scedit_mode[name] != "decoder"]
        if others:
            output = replace_first_tensor(output, self._tuned(first_tensor(output), others, rows, skip=False))
        return output


class _SCTuner(nn.Module):
    """One adapter's ``x + T(x + hint)`` as a module (its own layers, not copies); ``x`` is (B, C, H, W) or
    (B, tokens, C)."""

    def __init__(self, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__()
        self.down = down
        self.up = up

    def forward(self, x: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        tokens = (x if hint is None else x + hint.to(x.dtype)).to(self.down.weight.dtype)
        if x.dim() == 4:
            tokens = tokens.flatten(2).transpose(1, 2)
        out = self.up(F.gelu(self.down(tokens)))
        if x.dim() == 4:
            out = out.transpose(1, 2).reshape(x.shape)
        return x.to(out.dtype) + out
