"""The package's layers import one way, and PEFT's private state is touched in one module only.

compat <- core <- tuners <- conversion <- swift <- serve / demo; techniques and distributed sit beside
conversion (they use core and tuners, never conversion or swift). A tuner package imports no other tuner
package. No function imports a module of this package (such imports only hide cycles), except in ``__main__``
entry points, which import late so that ``--help`` answers at once. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "peft_swift_ext"

# (rank, group): a module may import lower ranks, and its own group; equal ranks of other groups are walls.
LAYERS = {
    "compat": (0, "compat"),
    "core": (1, "core"),
    "tuners": (2, "tuners"),
    "conversion": (3, "conversion"),
    "techniques": (3, "techniques"),
    "distributed": (3, "techniques"),
    "swift": (4, "swift"),
    "serve": (5, "serve"),
    "demo": (5, "demo"),
    "__init__": (6, "package"),
}
# PEFT's private attributes and modules: reached only through peft_swift_ext/compat.py.
PEFT_PRIVATE_ATTRIBUTES = {
    "_active_adapter",
    "_disable_adapters",
    "_all_available_adapter_names",
    "_get_available_adapters",
    "_adapters",
    "_freeze_non_trainable_peft_weights",
    "_move_adapter_to_device_of_base_layer",
    "_cast_adapter_dtype",
    "_value2member_map_",
    "_member_map_",
    "_member_names_",
}
PEFT_PRIVATE_MODULES = ("peft.utils.other", "peft.mapping")


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in functions) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if node.level and not node.module:  # "from . import x": each x is a module
                found += [(f"{module}.{alias.name}", node.lineno, id(node) in functions) for alias in node.names]
            else:
                found.append((module, node.lineno, id(node) in functions))
    return found


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    rank, group = LAYERS[key]
    if key == "tuners" and len(parts) > 2:
        group = f"tuners.{parts[2]}"  # each tuner package is its own group
    return rank, group


MODULES = _modules()


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_imports_point_down_the_layers(name, path):
    rank, group = _layer(name)
    wrong = []
    for module, line, _ in _imports(name, path):
        if not module.startswith("peft_swift_ext"):
            continue
        other_rank, other_group = _layer(module)
        aggregator = group == "tuners" and other_group.startswith("tuners.")  # tuners/__init__ gathers them
        if other_group != group and not aggregator and other_rank >= rank:
            wrong.append(f"line {line}: {module} ({other_group}, rank {other_rank})")
    assert not wrong, f"{name} ({group}, rank {rank}) imports upwards or sideways: {wrong}"


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_no_function_imports_a_module_of_the_package(name, path):
    if name.endswith(".__main__"):
        return  # command-line entry points import late on purpose, so that --help and bad flags answer at once
    local = [f"line {line}: {module}" for module, line, inside in _imports(name, path) if inside]
    local = [entry for entry in local if "peft_swift_ext" in entry]
    assert not local, f"{name} imports package modules inside functions (a hidden cycle): {local}"


@pytest.mark.parametrize(("name", "path"), MODULES, ids=[name for name, _ in MODULES])
def test_peft_private_state_is_touched_in_compat_only(name, path):
    if name == "peft_swift_ext.compat":
        return
    tree = ast.parse(path.read_text())
    touched = sorted(
        {f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        & {
            f"line {node.lineno}: .{node.attr}"
            for node in ast.walk(tree)
            if getattr(node, "attr", None) in PEFT_PRIVATE_ATTRIBUTES
        }
    )
    modules = [
        f"line {line}: {module}" for module, line, _ in _imports(name, path) if module.startswith(PEFT_PRIVATE_MODULES)
    ]
    assert not touched and not modules, f"{name} reaches into PEFT's private state: {touched + modules}"


def test_the_layer_table_covers_every_top_level_module():
    tops = {name.split(".")[1] if "." in name else "__init__" for name, _ in MODULES}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"
