"""Registration of this package's tuners into PEFT's own registry.

The ``PeftType`` member is added first (:func:`peft_swift_ext.compat.add_peft_type`), then
``register_peft_method`` is called. Both steps are idempotent: importing or reloading this package twice
leaves one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType, register_peft_method

from ..compat import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, add_peft_type


@dataclass(frozen=True)
class TunerSpec:
    """What this package knows about one registered tuner.

    Args:
        name: lower-case PEFT method name, e.g. ``"restuning"``.
        config_cls: the ``PeftConfig`` subclass.
        model_cls: the ``BaseTuner`` subclass.
        swift_types: the ``swift_type`` strings ms-swift writes for this tuner, used when loading
            ms-swift checkpoints.
    """

    name: str
    config_cls: type
    model_cls: type
    swift_types: tuple[str, ...] = field(default_factory=tuple)

    @property
    def peft_type(self) -> PeftType:
        """The tuner's member of PEFT's ``PeftType`` enum (its name upper-cased)."""
        return PeftType(self.name.upper())


#: name -> spec of every tuner this package registered, in registration order. A reload of this module
#: keeps the table: the tuners' own modules, which filled it, are not reloaded with it.
TUNERS: dict[str, TunerSpec] = globals().get("TUNERS", {})


def register_tuner(name: str, config_cls: type, model_cls: type, swift_types: tuple[str, ...] = ()) -> TunerSpec:
    """Register a tuner into PEFT's registry and this package's list, once.

    Args:
        name: lower-case method name; becomes ``PeftType.<NAME>``.
        config_cls: its ``PeftConfig`` subclass (its ``peft_type`` must equal the new member).
        model_cls: its ``BaseTuner`` subclass; ``model_cls.prefix`` is the parameter-name prefix.
        swift_types: ``swift_type`` values of ms-swift checkpoints that map to this tuner.
    """
    peft_type = add_peft_type(name)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    elif registered.__qualname__ != model_cls.__qualname__ or registered.__module__ != model_cls.__module__:
        raise KeyError(f"PEFT method '{name}' is already registered by {registered.__module__}.{registered.__name__}")
    else:
        # A module reload made new class objects; point PEFT at them so isinstance checks agree.
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    spec = TunerSpec(name, config_cls, model_cls, tuple(swift_types))
    TUNERS[name] = spec
    return spec


def spec_for_swift_type(swift_type: str) -> TunerSpec | None:
    """The registered tuner that reads ms-swift checkpoints of ``swift_type`` (case-insensitive)."""
    wanted = swift_type.upper()
    for spec in TUNERS.values():
        if wanted == spec.name.upper() or wanted in (t.upper() for t in spec.swift_types):
            return spec
    return None


def config_class_for(peft_type: str) -> type[PeftConfig]:
    """The config class registered in PEFT for ``peft_type``, with a clear error when unknown."""
    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(str(peft_type).upper())]
    except (KeyError, ValueError):
        known = sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ValueError(f"Unknown peft_type {peft_type!r}; registered types are: {', '.join(known)}") from None
