"""Registration of this package's tuners into PEFT's own registry.

PEFT only accepts methods whose upper-case name is a member of its ``PeftType`` enum, and it has no
plugin hook for adding members, so the member is added at run time before ``register_peft_method``
is called. Both steps are idempotent: importing or reloading this package twice leaves one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


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


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[NAME]``, adding the member to the enum if it is missing.

    Args:
        name: the method name; the member's name and value are its upper-case form.
    """
    value = name.upper()
    if value in PeftType._value2member_map_:
        return PeftType._value2member_map_[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    # Attribute access (PeftType.NAME) goes through the class dict on some Python versions.
    type.__setattr__(PeftType, value, member)
    return member


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
