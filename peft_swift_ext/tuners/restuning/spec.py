"""Reading Res-Tuning's ``tuner_cfg`` (SWIFT's format) into one plain description per bypass block.

``tuner_cfg`` is a name (``"res_adapter"``), a dict ``{"lateral_cfg": ..., "vertical_cfg": ..., "aux_cfg": ...}``
whose values are names or ``{name: options}`` dicts, or a list of those, one per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.validators import is_int

#: option -> default, per op kind; SWIFT's ``adapter_type`` is accepted and has no effect there or here.
OP_OPTIONS: dict[str, dict[str, object]] = {
    "res_adapter": {"adapter_length": 32, "adapter_weight": None, "adapter_type": None},
    "res_group_adapter": {"dim": None, "head": 4, "scale_factor": 2, "adapter_weight": None, "adapter_type": None},
    "upsample": {},
    "zero": {},
    "identity": {},
}
AUX_KINDS = ("upsample", "identity")
WEIGHT_TYPES = ("gate", "scale", "scale_channel")
_BLOCK_KEYS = ("lateral_cfg", "vertical_cfg", "aux_cfg")


@dataclass(frozen=True)
class OpSpec:
    """One lateral, vertical or auxiliary tuner of a block: its kind and options (defaults filled in)."""

    kind: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BlockSpec:
    """One bypass block: ``out = aux(lateral(stem feature) + vertical(bypass so far))``.

    Args:
        dim: feature width the block works at (``dims[i]``).
        lateral: tuner applied to the stem feature.
        vertical: tuner applied to the bypass output of the previous block (the root feature for block 0).
        aux: optional upsampling of the sum, or None.
        upsample_out_channels: output channels of the upsampling convolution, or None for no convolution.
        zero_init: zero-initialise the last linear layer of the block's adapters (SWIFT's ``zero_init_last``).
    """

    dim: int
    lateral: OpSpec
    vertical: OpSpec
    aux: OpSpec | None
    upsample_out_channels: int | None
    zero_init: bool

    def out_width(self) -> int:
        """Width of the block's output (the next block's vertical input, or the target's feature)."""
        if self.upsample_out_channels is not None and "upsample" in (
            self.lateral.kind,
            self.vertical.kind,
            self.aux.kind if self.aux else None,
        ):
            return self.upsample_out_channels
        return self.dim


def parse_op(value: object, where: str) -> OpSpec:
    """An :class:`OpSpec` from a name or ``{name: options}``; ``None`` is SWIFT's identity."""
    if value is None:
        return OpSpec("identity")
    if isinstance(value, str):
        kind, options = value, {}
    elif isinstance(value, dict) and len(value) == 1:
        kind, options = next(iter(value.items()))
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ValueError(f"{where}: options of {kind!r} must be a dict, got {options!r}")
    else:
        raise ValueError(f"{where} must be a tuner name or a one-entry dict {{name: options}}, got {value!r}")
    if kind not in OP_OPTIONS:
        raise ValueError(f"{where}: unknown tuner {kind!r}; choose one of {sorted(OP_OPTIONS)}")
    unknown = sorted(set(options) - set(OP_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"{where}: {kind!r} has no options {unknown}; its options are {sorted(OP_OPTIONS[kind])}")
    filled = {**OP_OPTIONS[kind], **options}
    _check_op_options(kind, filled, where)
    return OpSpec(kind, filled)


def _check_op_options(kind: str, options: dict, where: str) -> None:
    weight = options.get("adapter_weight")
    if weight is not None and weight not in WEIGHT_TYPES and not _is_scalar_weight(weight):
        raise ValueError(
            f"{where}: adapter_weight={weight!r} is not supported; use None, 'gate', 'scale', 'scale_channel' or "
            "'scalar_<number>' (SWIFT's 'scale_kv*' weights have no effect there)"
        )
    if kind == "res_adapter":
        length = options["adapter_length"]
        lengths = length if isinstance(length, list) else [length]
        if not lengths or not all(_is_positive_int(n) for n in lengths):
            raise ValueError(f"{where}: adapter_length must be a positive int or a list of them, got {length!r}")
    if kind == "res_group_adapter":
        for name in ("head", "scale_factor", "dim"):  # dim may be None (the block's)
            if not _is_positive_int(options[name]) and not (name == "dim" and options[name] is None):
                raise ValueError(f"{where}: {name} must be a positive int, got {options[name]!r}")


def _is_scalar_weight(weight: object) -> bool:
    if not isinstance(weight, str) or not weight.startswith("scalar_"):
        return False
    try:
        float(weight.rsplit("_", 1)[-1])
    except ValueError:
        return False
    return True


def check_tuner_cfg(tuner_cfg: object) -> None:
    """Validate the shape of ``ResTuningConfig.tuner_cfg`` (everything that does not depend on the model)."""
    entries = tuner_cfg if isinstance(tuner_cfg, list) else [tuner_cfg]
    if not entries:
        raise ValueError("ResTuningConfig.tuner_cfg must not be an empty list")
    for index, entry in enumerate(entries):
        where = f"ResTuningConfig.tuner_cfg[{index}]" if isinstance(tuner_cfg, list) else "ResTuningConfig.tuner_cfg"
        _parse_block_cfg(entry, where, use_upsample=False, last=True)


def _parse_block_cfg(
    entry: object, where: str, use_upsample: bool, last: bool
) -> tuple[OpSpec, OpSpec, OpSpec | None]:
    if isinstance(entry, str):
        op = parse_op(entry, where)
        aux = OpSpec("upsample") if use_upsample and not last else None
        return op, op, aux
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(_BLOCK_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; a block is configured by {list(_BLOCK_KEYS)}")
        lateral = parse_op(entry.get("lateral_cfg"), f"{where}['lateral_cfg']")
        vertical = parse_op(entry.get("vertical_cfg"), f"{where}['vertical_cfg']")
        aux = None
        if entry.get("aux_cfg"):
            aux = parse_op(entry["aux_cfg"], f"{where}['aux_cfg']")
            if aux.kind not in AUX_KINDS:
                raise ValueError(f"{where}['aux_cfg'] must be one of {list(AUX_KINDS)}, got {aux.kind!r}")
        return lateral, vertical, aux
    raise ValueError(f"{where} must be a tuner name or a dict of lateral_cfg/vertical_cfg/aux_cfg, got {entry!r}")


def block_specs(config, depth: int) -> list[BlockSpec]:
    """One :class:`BlockSpec` per stem module, from a ``ResTuningConfig``; ``ValueError`` names the field.

    Args:
        config: the ``ResTuningConfig``.
        depth: the number of stem modules (= bypass blocks).
    """
    dims = _per_block(config.dims, depth, "dims")
    cfgs = _per_block(config.tuner_cfg, depth, "tuner_cfg")
    upsample_out = _per_block(config.upsample_out_channels, depth, "upsample_out_channels")
    listed = isinstance(config.tuner_cfg, list)
    specs = []
    for index in range(depth):
        where = f"ResTuningConfig.tuner_cfg[{index}]" if listed else "ResTuningConfig.tuner_cfg"
        last = index == depth - 1
        lateral, vertical, aux = _parse_block_cfg(cfgs[index], where, config.use_upsample, last)
        lateral, vertical = (_for_block(op, index) for op in (lateral, vertical))
        specs.append(
            BlockSpec(dims[index], lateral, vertical, aux, upsample_out[index], config.zero_init_last and last)
        )
    for index, (spec, following) in enumerate(zip(specs, specs[1:])):
        if following.vertical.kind != "zero" and spec.out_width() != following.dim:
            raise ValueError(
                f"ResTuningConfig.dims / upsample_out_channels: bypass block {index} outputs {spec.out_width()} "
                f"channels but block {index + 1} works at dims[{index + 1}]={following.dim}"
            )
    return specs


def _for_block(op: OpSpec, index: int) -> OpSpec:
    """Pick this block's entry of per-block option lists (``adapter_length=[...]``)."""
    length = op.options.get("adapter_length")
    if isinstance(length, list):
        if index >= len(length):
            raise ValueError(f"ResTuningConfig.tuner_cfg: adapter_length {length} has no entry for block {index}")
        return OpSpec(op.kind, {**op.options, "adapter_length": length[index]})
    return op


def _per_block(value: object, depth: int, field_name: str) -> list:
    if isinstance(value, list):
        if len(value) != depth:
            raise ValueError(
                f"ResTuningConfig.{field_name} has {len(value)} entries but stem_modules selects {depth} modules; "
                "give one entry per stem module (or a single value for all)"
            )
        return list(value)
    return [value] * depth


def _is_positive_int(value: object) -> bool:
    return is_int(value) and value > 0
