"""Griffe extension: a dataclass field's ``metadata={"help": ...}`` becomes its docstring.

PEFT-style configs document each field in ``field(metadata={"help": ...})`` rather than in a docstring; with
this extension the API reference shows that text under the field, and the field's value as ``default``.
"""

from __future__ import annotations

import ast

from griffe import Docstring, Extension


def _help_of(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, value in zip(keyword.value.keys, keyword.value.values):
                is_help = isinstance(key, ast.Constant) and key.value == "help"
                if is_help and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return value.value
    return None


def _default_of(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "default":
            return ast.unparse(keyword.value)
        if keyword.arg == "default_factory":
            factory = keyword.value
            if isinstance(factory, ast.Lambda):
                return ast.unparse(factory.body)
            return f"{ast.unparse(factory)}()"
    return None


class FieldHelp(Extension):
    def on_attribute_instance(self, *, node, attr, agent, **kwargs) -> None:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.value, ast.Call):
            return
        call = node.value
        if not (isinstance(call.func, ast.Name) and call.func.id == "field"):
            return
        text = _help_of(call)
        if text and attr.docstring is None:
            attr.docstring = Docstring(text, parent=attr)
        default = _default_of(call)
        if default is not None:
            attr.value = default
