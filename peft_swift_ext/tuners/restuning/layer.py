"""Res-Tuning's bypass network and the layer that feeds its output to the target module.

Math (ms-swift's, per bypass block ``i`` with stem feature ``s_i`` and bypass state ``b``; ``b_0`` is the
root feature, all backbone features detached):
    b_{i+1} = aux_i(lateral_i(s_i) + vertical_i(b_i))
    res_adapter(x)       = x + w * W2 GELU(W1 x + c1) + c2        (on the channel / last dimension)
    res_group_adapter(x) = the same per channel group of ``dim / head`` channels (4-D features only)
    upsample(x)          = conv3x3(nearest-resize(x, size of the next stem feature))   (conv optional)
    zero(x) = 0, identity(x) = x
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
from ...core.slots import ArgumentSlot, output_value, replace_output_value
from .recompute import adapter_mlp
from .spec import BlockSpec, OpSpec

_FIELD = "ResTuningConfig.target_hidden_pos"


def make_scaling(kind: str | None, dim: int) -> nn.Module | nn.Parameter | None:
    """The learned part of SWIFT's ``adapter_weight``: a gate ``Linear(dim, 1)`` or a scale (init 1), if any."""
    if kind == "gate":
        return nn.Linear(dim, 1)
    if kind in ("scale", "scale_channel"):
        return nn.Parameter(torch.ones(1 if kind == "scale" else dim))
    return None


def apply_scaling(out: torch.Tensor, kind: str | None, scaling) -> torch.Tensor:
    """Weight an adapter output ``out`` of shape (batch, tokens, channels) as ``adapter_weight`` says.

    ``gate``: times the token mean of sigmoid(Linear(out)); ``scale``/``scale_channel``: times the learned
    factor; ``scalar_<v>``: times ``v``; None: unchanged.
    """
    if kind is None:
        return out
    if kind == "gate":
        return out * torch.sigmoid(scaling(out)).mean(dim=1).view(-1, 1, 1)
    if kind in ("scale", "scale_channel"):
        return out * scaling
    return out * float(kind.rsplit("_", 1)[-1])


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); token tensors (B, N, C) pass through."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def _like(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`_as_tokens` for a result of ``x``'s shape."""
    if x.dim() != 4:
        return tokens
    batch, _, height, width = x.shape
    return tokens.transpose(1, 2).reshape(batch, tokens.shape[-1], height, width)


def _init_linear(linear: nn.Linear, scheme: str, zero: bool) -> None:
    if zero:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    elif scheme == "xavier":
        nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(linear.bias, std=1e-6)
    else:
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        nn.init.normal_(linear.bias)


class ResAdapter(nn.Module):
    """``x + weight(W2 GELU(W1 x))`` over the channels; keys ``ln1``, ``ln2``, ``scaling`` as in ms-swift."""

    def __init__(self, dim: int, adapter_length: int, adapter_weight: str | None, zero_init: bool) -> None:
        super().__init__()
        self.ln1 = nn.Linear(dim, adapter_length)
        self.ln2 = nn.Linear(adapter_length, dim)
        _init_linear(self.ln1, "xavier", zero=False)
        _init_linear(self.ln2, "xavier", zero=zero_init)
        self.adapter_weight = adapter_weight
        self.scaling = make_scaling(adapter_weight, dim)

    def forward(self, x: torch.Tensor, target_size=None) -> torch.Tensor:
        tokens = _as_tokens(x.to(self.ln1.weight.dtype))
        out = apply_scaling(adapter_mlp(tokens, self.ln1, self.ln2), self.adapter_weight, self.scaling)
        return (x.to(out.dtype) + _like(out, x)).to(x.dtype)


class ResGroupAdapter(nn.Module):
    """:class:`ResAdapter` applied to each of ``head`` channel groups, with shared weights (4-D features)."""

    def __init__(
        self,
        dim: int,
        group_dim: int | None,
        head: int,
        scale_factor: int,
        adapter_weight: str | None,
        zero_init: bool,
    ) -> None:
        super().__init__()
        group_dim = group_dim or dim
        if group_dim != dim or dim % head:
            raise ValueError(
                f"res_group_adapter needs its dim ({group_dim}) equal to the block's dims ({dim}) and divisible by "
                f"head={head}"
            )
        self.head = head
        width = dim // head
        self.ln1 = nn.Linear(width, width * scale_factor)
        self.ln2 = nn.Linear(width * scale_factor, width)
        _init_linear(self.ln1, "kaiming", zero=False)
        _init_linear(self.ln2, "kaiming", zero=zero_init)
        self.adapter_weight = adapter_weight
        self.scaling = make_scaling(adapter_weight, dim)

    def forward(self, x: torch.Tensor, target_size=None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"res_group_adapter needs (batch, channels, height, width) features, got {tuple(x.shape)}"
            )
        tokens = _as_tokens(x.to(self.ln1.weight.dtype))
        batch, count, channels = tokens.shape
        # channel c * head + h belongs to group h (ms-swift's "(c h)" channel layout)
        groups = tokens.reshape(batch, count, channels // self.head, self.head).permute(0, 3, 1, 2)
        out = adapter_mlp(groups, self.ln1, self.ln2)
        out = out.permute(0, 2, 3, 1).reshape(batch, count, channels)
        out = apply_scaling(out, self.adapter_weight, self.scaling)
        return (x.to(out.dtype) + _like(out, x)).to(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``target_size`` (or 2x), then an optional zero-initialised 3x3 convolution."""

    def __init__(self, dim: int, out_channels: int | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_channels, 3, padding=1) if out_channels else None
        if self.conv is not None:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, target_size=None) -> torch.Tensor:
        size, scale = (None, 2) if target_size is None else (tuple(target_size), None)
        resized = F.interpolate(x.float(), size=size, scale_factor=scale, mode="nearest").to(x.dtype)
        if self.conv is None:
            return resized
        return self.conv(resized.to(self.conv.weight.dtype)).to(x.dtype)


class Identity(nn.Module):
    """A tuner op that passes its input through (``identity``); ``target_size`` is accepted and ignored."""

    def forward(self, x: torch.Tensor, target_size=None) -> torch.Tensor:
        return x


def build_op(op: OpSpec, dim: int, upsample_out_channels: int | None, zero_init: bool) -> nn.Module | None:
    """The module of one tuner, or None for ``zero`` (which contributes nothing)."""
    if op.kind == "zero":
        return None
    if op.kind == "identity":
        return Identity()
    if op.kind == "upsample":
        return Upsample(dim, upsample_out_channels)
    options = op.options
    if op.kind == "res_adapter":
        return ResAdapter(dim, options["adapter_length"], options["adapter_weight"], zero_init)
    return ResGroupAdapter(
        dim, options["dim"], options["head"], options["scale_factor"], options["adapter_weight"], zero_init
    )


class ResTuningBlock(nn.Module):
    """One bypass block: ``aux(lateral(stem) + vertical(bypass))``; absent tuners are ``zero``."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.dim = spec.dim
        self.lateral = build_op(spec.lateral, spec.dim, spec.upsample_out_channels, spec.zero_init)
        self.vertical = build_op(spec.vertical, spec.dim, spec.upsample_out_channels, spec.zero_init)
        self.aux = build_op(spec.aux, spec.dim, spec.upsample_out_channels, False) if spec.aux else None

    def forward(self, stem: torch.Tensor, bypass: torch.Tensor, target_size=None) -> torch.Tensor:
        terms = [op(x) for op, x in ((self.lateral, stem), (self.vertical, bypass)) if op is not None]
        out = terms[0] + terms[1] if len(terms) == 2 else terms[0] if terms else torch.zeros_like(stem)
        return self.aux(out, target_size) if self.aux is not None else out


class ResTuningBypass(nn.Module):
    """The bypass network of one adapter: a chain of :class:`ResTuningBlock`, one per stem feature.

    Called as ``(root, *stems)``; ``stem_names`` (the stems' paths) name them in width errors.
    """

    def __init__(self, specs: list[BlockSpec], stem_names: list[str]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResTuningBlock(spec) for spec in specs)
        self.stem_names = list(stem_names)

    def forward(self, root: torch.Tensor, *stems: torch.Tensor) -> torch.Tensor:
        bypass = root
        for index, (block, stem) in enumerate(zip(self.blocks, stems)):
            _check_width(block, stem, block.lateral, self.stem_names[index], f"stem feature {index}")
            _check_width(block, bypass, block.vertical, self.stem_names[index], f"bypass input of block {index}")
            target_size = stems[index + 1].shape[2:] if index + 1 < len(stems) else None
            bypass = block(stem, bypass, target_size)
        return bypass


def _check_width(block: ResTuningBlock, x: torch.Tensor, op: nn.Module | None, stem: str, what: str) -> None:
    if op is None or isinstance(op, Identity):
        return
    width = x.shape[1] if x.dim() == 4 else x.shape[-1]
    if width != block.dim:
        raise ValueError(
            f"ResTuningConfig.dims: the {what} (at stem '{stem}') has {width} channels but the block works at "
            f"{block.dim}; set dims to the features' widths"
        )


class ResTuningLayer(SwiftTunerLayer):
    """The target module with, per adapter, the bypass network whose output replaces its input or output.

    The root and stem features reach the bypass through forward hooks that this layer owns (one set per
    adapter, removed with the adapter) and that store detached features per thread.

    Args:
        base_layer: the target module.
    """

    adapter_layer_names = ("restuning_bypass",)
    other_param_names = ("restuning_hook", "restuning_hidden_pos")
    tuner_name = "Res-Tuning"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.restuning_bypass = nn.ModuleDict()
        self.restuning_hook: dict[str, str] = {}
        self.restuning_hidden_pos: dict[str, int | str] = {}
        self.probes = FeatureProbes(detach=True)
        self.layer_name = ""

    def update_layer(
        self,
        adapter_name: str,
        specs: list[BlockSpec],
        sources: list[ProbeSource],
        hook: str,
        hidden_pos: int | str,
        layer_name: str,
    ) -> None:
        """Add one adapter.

        Args:
            adapter_name: its name.
            specs: one block description per stem.
            sources: the root feature first, then one per stem, in block order.
            hook: ``"input"`` or ``"output"`` of this layer's module is replaced.
            hidden_pos: which argument / output element is replaced.
            layer_name: this layer's path in the model (for error messages).
        """
        self.restuning_bypass[adapter_name] = ResTuningBypass(specs, [source.name for source in sources[1:]])
        self.restuning_hook[adapter_name] = hook
        self.restuning_hidden_pos[adapter_name] = hidden_pos
        self.layer_name = layer_name
        self.probes.attach(adapter_name, sources, self.capturing)
        move_adapter_to_base_device(self, adapter_name)

    def _bypass_rows(self, value: torch.Tensor, rows: tuple[str, ...], names: list[str]) -> torch.Tensor:
        """``value`` with each row that names one of ``names`` replaced by its own adapter's bypass output."""
        plan = plan_rows(rows, names, value.shape[0], self.layer_name)
        for group in split_plan(plan, lambda name: structure_key(self.restuning_bypass[name])):
            features = [self.probes.take(name, self.layer_name) for name in group.adapters]
            inputs = []
            for source in range(len(features[0])):  # root, then one per stem: each row from its adapter's capture
                gathered = features[0][source].new_empty((len(group.rows), *features[0][source].shape[1:]))
                for k, captured in enumerate(features):
                    chosen = group.index == k
                    gathered[chosen] = captured[source][group.rows[chosen]]
                inputs.append(gathered)
            bypasses = [self.restuning_bypass[name] for name in group.adapters]
            value = value.clone()
            value[group.rows] = per_row(bypasses, group.index, *inputs).to(value.dtype)
        return value

    def forward(self, *args, **kwargs):
        rows = current_rows()
        names = list(self.adapters_to_apply()) if rows is None else [n for n in self.restuning_bypass if n in rows]
        for position, group in self._by_position("input", names, rows):
            slot = ArgumentSlot(self.base_layer, position)
            value = slot.get(args, kwargs)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"ResTuningConfig.target_hidden_pos={position!r}: {self.layer_name} was called without that "
                    "argument"
                )
            args, kwargs = slot.replace(args, kwargs, self._bypassed(value, group, rows))
        output = self.base_layer(*args, **kwargs)
        for position, group in self._by_position("output", names, rows):
            value = output_value(output, position, _FIELD, self.layer_name)
            bypassed = self._bypassed(value, group, rows)
            output = replace_output_value(output, position, bypassed, _FIELD, self.layer_name)
        return output

    def _by_position(self, hook: str, names: list[str], rows: tuple[str, ...] | None) -> list[tuple]:
        """``(position, adapters)`` of ``names`` on ``hook``: each adapter in turn (the last one wins), or in a mixed
        batch, the adapters of each position together."""
        picked = [(self.restuning_hidden_pos[name], name) for name in names if self.restuning_hook[name] == hook]
        if rows is None:
            return [(position, [name]) for position, name in picked]
        found: dict = {}
        for position, name in picked:
            found.setdefault(position, []).append(name)
        return list(found.items())

    def _bypassed(self, value: torch.Tensor, names: list[str], rows: tuple[str, ...] | None) -> torch.Tensor:
        if rows is not None:
            return self._bypass_rows(value, rows, names)
        (name,) = names
        return self.restuning_bypass[name](*self.probes.take(name, self.layer_name)).to(value.dtype)
