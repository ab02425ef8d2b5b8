"""Checks of config values, shared by every tuner's config and by the checkpoint reader.

Each check raises ``ValueError`` naming ``<ConfigClass>.<field>``, what it must be and the value it got, so a
bad value fails where it is given, before any model changes.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path


def _fail(config: object, name: str, expected: str, value: object) -> typing.NoReturn:
    raise ValueError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")


def is_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` proper (``bool`` is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``) and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(config: object, name: str, what: str = "", minimum: int = 1) -> int:
    """Check that ``config.<name>`` is an int of at least ``minimum`` and return it.

    Args:
        config: the config being validated.
        name: the field.
        what: a short description added to the message (e.g. "the hidden size").
        minimum: the smallest value allowed.
    """
    value = getattr(config, name)
    if not is_int(value) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        _fail(config, name, kind + (f" ({what})" if what else ""), value)
    return value


def positive_ints(config: object, name: str, what: str = "") -> list[int]:
    """Check that ``config.<name>`` is a positive int or a non-empty list of them; return them as a list (``what`` is
    added to the message)."""
    value = getattr(config, name)
    values = value if isinstance(value, list) else [value]
    if not values or not all(is_int(v) and v > 0 for v in values):
        _fail(config, name, "a positive int or a list of them" + (f" ({what})" if what else ""), value)
    return values


def positive_number(config: object, name: str, upper: float | None = None) -> float:
    """Check that ``config.<name>`` is a finite number above 0 (and at most ``upper`` if given) and return it.

    NaN and infinity are refused: they would silently poison training (e.g. a learning-rate ratio).
    """
    value = getattr(config, name)
    if not is_number(value) or value <= 0 or (upper is not None and value > upper):
        expected = "a finite number > 0" if upper is None else f"a number in (0, {upper}]"
        _fail(config, name, expected, value)
    return value


def position(config: object, name: str, optional: bool = False) -> int | str | None:
    """Check that ``config.<name>`` is a SWIFT position: an int (index) or a str (name), or None if ``optional``."""
    value = getattr(config, name)
    if not (is_int(value) or isinstance(value, str) or (optional and value is None)):
        _fail(config, name, "an int, a str" + (" or None" if optional else ""), value)
    return value


def boolean(config: object, *names: str) -> None:
    """Check that ``config.<name>`` is True or False for each of ``names``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            _fail(config, name, "True or False", value)


def required(config: object, name: str, what: str) -> object:
    """Check that ``config.<name>`` is set (not None) and return it.

    Args:
        config: the config being validated.
        name: the field.
        what: what to set it to, for the message (e.g. "a regex or a list of module names").
    """
    value = getattr(config, name)
    if value is None:
        raise ValueError(f"{type(config).__name__}.{name} must be set ({what})")
    return value


def target_list(config: object, name: str = "target_modules") -> None:
    """Make a set-valued ``config.<name>`` a sorted list (JSON has no sets; saved configs must compare equal)."""
    value = getattr(config, name)
    if isinstance(value, (set, frozenset, tuple)):
        setattr(config, name, sorted(value))


def check_field_types(config_cls: type, fields: dict, source: Path | str) -> None:
    """Raise ``ValueError`` naming the field when a value does not fit the dataclass annotation."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # unresolvable forward references: skip the check rather than refuse a valid config
        return
    for name, value in fields.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            raise ValueError(
                f"{source}: field {name!r} of {config_cls.__name__} has a {type(value).__name__} "
                f"value {value!r}, which does not fit {_hint_name(hint)}"
            )


def _fits(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        # PEFT writes families of values as one placeholder entry: "pissa_niter_[number of iters]"
        options = typing.get_args(hint)
        families = tuple(option.split("[")[0] for option in options if isinstance(option, str) and "[" in option)
        return value in options or (isinstance(value, str) and bool(families) and value.startswith(families))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        item_hint = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else None
        return item_hint is None or all(_fits(item, item_hint) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, str) and hint is not str:  # str enums such as PeftType / TaskType
            return isinstance(value, str)
        return isinstance(value, hint)
    return True


def _hint_name(hint: object) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
