"""Every public callable of the package has a docstring that names each of its parameters.

The API reference is generated from the docstrings (mkdocstrings), so a missing docstring is a blank entry in
the docs. Walked here: the names in ``peft_swift_ext.__all__``, every registered tuner's config and model class,
``Swift`` and ``SwiftModel``, and the public methods (and properties) that these classes define themselves or
inherit from this package's own base classes. Methods inherited unchanged from PEFT, torch or transformers are
theirs to document and are skipped; a method of ours that overrides a PEFT method and deliberately keeps PEFT's
docstring is named in ``INHERITS_PEFT_DOCSTRING``.

A parameter counts as documented when its name appears as a word in the docstring (``self``/``cls`` aside;
``*args``/``**kwargs`` by their names). A config field counts as documented when its ``field(metadata={"help":
...})`` has text or the class docstring names it.

Beyond the API reference, every public function, class and method of the modules under
``peft_swift_ext/tuners/`` (of the registered tuners), ``peft_swift_ext/{core,conversion,swift}/`` and
``peft_swift_ext.compat`` needs a docstring (their parameters are not checked: they are internal helpers).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import peft
import pytest

import peft_swift_ext
from peft_swift_ext import Swift, SwiftModel

# Overrides of PEFT methods whose behaviour (and so documentation) is PEFT's: (class name, method name).
INHERITS_PEFT_DOCSTRING: set[tuple[str, str]] = set()
# Attributes that are not part of the API although their names are public.
NOT_API = {"forward", "prepare_inputs_for_generation", "training", "dump_patches", "call_super_init"}


def _ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("peft_swift_ext")


def _classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in peft_swift_ext.__all__:
        obj = getattr(peft_swift_ext, name)
        if inspect.isclass(obj):
            found[obj.__qualname__] = obj
    for spec in peft_swift_ext.TUNERS.values():
        for cls in (spec.config_cls, spec.model_cls):
            found[cls.__qualname__] = cls
    found["Swift"], found["SwiftModel"] = Swift, SwiftModel
    return found


def _functions() -> list[tuple[str, object]]:
    return [
        (name, getattr(peft_swift_ext, name))
        for name in peft_swift_ext.__all__
        if inspect.isfunction(getattr(peft_swift_ext, name))
    ]


def _own_members(cls: type) -> list[tuple[str, object]]:
    """Public methods/properties that ``cls`` defines or inherits from a class of this package."""
    members: dict[str, object] = {}
    for owner in reversed(cls.__mro__):
        if not _ours(owner):
            continue
        for name, value in vars(owner).items():
            if name.startswith("_") or name in NOT_API:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                members[name] = value
    return sorted(members.items())


def _callables() -> list[tuple[str, object]]:
    items = list(_functions())
    for qualname, cls in sorted(_classes().items()):
        items.append((qualname, cls))
        items += [(f"{qualname}.{name}", value) for name, value in _own_members(cls)]
    return items


def _documented_parameters(func) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


def _mentions(doc: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}\b", doc) is not None


def _own_fields(cls: type) -> list[str]:
    inherited = peft.LoraConfig if issubclass(cls, peft.LoraConfig) else peft.PeftConfig
    return [f.name for f in dataclasses.fields(cls) if f.name not in inherited.__dataclass_fields__]


CALLABLES = _callables()


@pytest.mark.parametrize(("name", "obj"), CALLABLES, ids=[name for name, _ in CALLABLES])
def test_public_callable_has_a_docstring_naming_its_parameters(name: str, obj):
    owner, _, method = name.rpartition(".")
    if (owner, method) in INHERITS_PEFT_DOCSTRING:
        return
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        assert doc.strip(), f"class {name} has no docstring"
        if dataclasses.is_dataclass(obj):
            helps = {f.name: (f.metadata or {}).get("help") for f in dataclasses.fields(obj)}
            undocumented = [f for f in _own_fields(obj) if not helps.get(f) and not _mentions(doc, f)]
            assert not undocumented, f"{name}: fields with neither metadata help nor a mention: {undocumented}"
            return
        init = obj.__dict__.get("__init__")
        if init is not None and _ours(init):
            text = doc + (init.__doc__ or "")
            missing = [p for p in _documented_parameters(init) if not _mentions(text, p)]
            assert not missing, f"{name}: constructor parameters not documented: {missing}"
        return
    func = obj.fget if isinstance(obj, property) else obj
    doc = func.__doc__ or ""
    assert doc.strip(), f"{name} has no docstring"
    if isinstance(obj, property):
        return
    missing = [p for p in _documented_parameters(func) if not _mentions(doc, p)]
    assert not missing, f"{name}: parameters not mentioned in the docstring: {missing}"


def _internal_modules() -> list:
    import peft_swift_ext.tuners

    packages = {"peft_swift_ext.swift", "peft_swift_ext.core", "peft_swift_ext.conversion"}
    for spec in peft_swift_ext.TUNERS.values():
        packages.add(spec.model_cls.__module__.rpartition(".")[0])
    names = {"peft_swift_ext.compat"}
    for package in sorted(packages):
        names.add(package)
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.iter_modules(path, f"{package}.")}
    return [importlib.import_module(name) for name in sorted(names)]


def _internal_callables() -> list[tuple[str, object]]:
    found = []
    for module in _internal_modules():
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                found.append((f"{module.__name__}.{name}", obj))
            elif inspect.isclass(obj):
                found.append((f"{module.__name__}.{name}", obj))
                for member, value in vars(obj).items():
                    if member.startswith("_") or member in NOT_API:
                        continue
                    if isinstance(value, (staticmethod, classmethod)):
                        value = value.__func__
                    if isinstance(value, property):
                        value = value.fget
                    if inspect.isfunction(value):
                        found.append((f"{module.__name__}.{name}.{member}", value))
    return found


def test_every_public_helper_of_tuners_and_swift_has_a_docstring():
    missing = []
    for name, obj in _internal_callables():
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        owner, _, method = name.rpartition(".")
        if not (doc or "").strip() and (owner.rpartition(".")[2], method) not in INHERITS_PEFT_DOCSTRING:
            missing.append(name)
    assert not missing, f"public functions/classes/methods without a docstring: {missing}"


def test_allow_list_names_real_overrides():
    """Every allow-listed method exists on its class (stale entries are removed)."""
    classes = _classes()
    for owner, method in INHERITS_PEFT_DOCSTRING:
        assert owner in classes and method in vars(classes[owner]), f"{owner}.{method} is not an override"


def test_no_function_has_two_docstrings():
    """A second string right after a docstring (two people documenting the same method) is dead text."""
    import ast

    found = []
    for module in _internal_modules():
        source = inspect.getsource(module)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and len(node.body) > 1:
                first, second = node.body[:2]
                strings = [
                    isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)
                    for s in (first, second)
                ]
                if all(strings):
                    found.append(f"{module.__name__}.{node.name} (line {node.lineno})")
    assert not found, f"functions with a second docstring: {found}"
