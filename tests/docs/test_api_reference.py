"""The API reference (docs/api/*.md, rendered by mkdocstrings) covers the public API and names real objects."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

API_DIR = Path(__file__).resolve().parents[2] / "docs" / "api"
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)
PUBLIC_MODULES = ["peft_swift_ext", "peft_swift_ext.techniques"]
# Names documented as part of a module directive rather than on their own.
COVERED_BY_MODULE = {"TUNERS": "peft_swift_ext.core.registry", "register_tuner": "peft_swift_ext.core.registry"}


def _directives() -> list[str]:
    return [name for page in sorted(API_DIR.glob("*.md")) for name in DIRECTIVE.findall(page.read_text())]


def _resolve(path: str):
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path", _directives())
def test_every_api_directive_names_an_existing_object(path: str):
    _resolve(path)


def _public_objects() -> list[tuple[str, str]]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [(module_name, name) for name in module.__all__]
    return names


@pytest.mark.parametrize(("module_name", "name"), _public_objects(), ids=lambda v: v)
def test_every_public_name_is_in_the_api_reference(module_name: str, name: str):
    obj = getattr(importlib.import_module(module_name), name)
    documented = set(_directives())
    if name in COVERED_BY_MODULE:
        assert COVERED_BY_MODULE[name] in documented
        return
    qualified = {f"{module_name}.{name}"}
    if inspect.isclass(obj) or inspect.isfunction(obj):
        qualified |= {f"{obj.__module__}.{obj.__qualname__}", f"peft_swift_ext.tuners.{name}"}
    # The same object documented under another public path (LisaConfig: peft_swift_ext.techniques.LisaConfig).
    same_object = any(_resolve_or_none(path) is obj for path in documented)
    assert qualified & documented or same_object, f"{module_name}.{name} is not in any ::: directive of docs/api/"


def _resolve_or_none(path: str):
    try:
        return _resolve(path)
    except (ImportError, AttributeError):
        return None


@pytest.mark.parametrize(("module_name", "name"), _public_objects(), ids=lambda v: v)
def test_every_public_class_and_function_has_a_docstring(module_name: str, name: str):
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__, f"{name} has no docstring"
