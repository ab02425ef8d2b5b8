"""Each tuner page's config table lists every field of the tuner's config with the default the code has.

The table is the Markdown table on the tuner's page whose rows start with a back-quoted field name
(`| `field` | default | meaning |`). Fields inherited from PEFT's ``PeftConfig`` (or, for LoRA-based tuners,
``LoraConfig``) are PEFT's to document and are not required. A default of ``None`` in the code may be documented
as ``required`` (checked when the config is built) or as the name of the field it is derived from.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import peft
import pytest

import peft_swift_ext

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*([^|]*)\|", re.MULTILINE)


def _page(name: str) -> Path | None:
    # a technique registered as a tuner (LISA) documents its config on its technique page
    for candidate in (DOCS / "tuners" / f"{name}.md", DOCS / "techniques" / f"{name}.md"):
        if candidate.exists():
            return candidate
    return None


def _own_fields(config_cls: type) -> list[dataclasses.Field]:
    inherited = peft.LoraConfig if issubclass(config_cls, peft.LoraConfig) else peft.PeftConfig
    return [f for f in dataclasses.fields(config_cls) if f.name not in inherited.__dataclass_fields__]


def _code_default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _matches(documented: str, default: object, field_names: set[str]) -> bool:
    text = documented.strip()
    literal = text.split("`")[1] if text.count("`") >= 2 else text
    if default is dataclasses.MISSING:
        return text.lower().startswith("required")
    if default is None and (text.lower().startswith("required") or literal in field_names):
        return True
    if literal.replace('"', "'") == repr(default).replace('"', "'"):
        return True
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(literal) == float(default)
        except ValueError:
            return False
    if isinstance(default, (list, tuple)):
        return literal.replace('"', "'").replace("(", "[").replace(")", "]") == repr(list(default)).replace('"', "'")
    return False


TUNERS = sorted(peft_swift_ext.TUNERS.items())


@pytest.mark.parametrize(("name", "spec"), TUNERS, ids=[name for name, _ in TUNERS])
def test_tuner_page_lists_every_config_field_with_its_default(name, spec):
    page = _page(name)
    if page is None:
        pytest.skip(f"no page for {name} (test_every_registered_tuner_has_a_page reports it)")
    rows: dict[str, str] = {}
    for field_name, documented in ROW.findall(page.read_text(encoding="utf-8")):
        rows.setdefault(field_name, documented)  # the config table comes before any later table
    fields = _own_fields(spec.config_cls)
    names = {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in rows]
    wrong = [
        f"{f.name}: page says {rows[f.name].strip()!r}, code has {_code_default(f)!r}"
        for f in fields
        if f.name in rows and not _matches(rows[f.name], _code_default(f), names)
    ]
    assert not missing, f"{page.name}: config fields missing from the table: {missing}"
    assert not wrong, f"{page.name}: defaults differ from {spec.config_cls.__name__}: {wrong}"
