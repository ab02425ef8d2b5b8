"""Each layer of the package stays within a line budget, so that its size grows by decision, not by drift.

The one-way architecture (docs/architecture.md) was meant to leave the package smaller: shared code in the core
instead of a copy per tuner. A budget is a layer's size (lines as ``wc -l`` counts them) after the slimming pass
that followed, plus a little headroom. A change that needs more raises the budget in the same commit and says why
in its message (a new capability); duplication and boilerplate should find the shared home instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "peft_swift_ext"

# layer (a sub-package or a top-level module) -> the most lines its .py files may hold together
BUDGETS = {
    "__init__.py": 60,
    "compat.py": 150,
    "core": 2920,
    "tuners": 4890,
    "conversion": 570,
    "techniques": 1540,
    "distributed.py": 330,
    "swift": 2530,
    "serve": 1220,
    "demo": 1070,
}


def _layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def _lines(layer: str) -> int:
    return sum(len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py") if _layer_of(path) == layer)


@pytest.mark.parametrize("layer", sorted(BUDGETS))
def test_layer_within_its_line_budget(layer: str) -> None:
    lines = _lines(layer)
    assert lines <= BUDGETS[layer], (
        f"peft_swift_ext/{layer} has {lines} lines, over its budget of {BUDGETS[layer]}: share code through "
        "peft_swift_ext/core where it repeats, or raise the budget in tests/architecture/test_line_budget.py "
        "saying why"
    )


def test_every_module_is_in_a_budgeted_layer() -> None:
    unbudgeted = sorted({_layer_of(path) for path in PACKAGE.rglob("*.py")} - set(BUDGETS))
    assert not unbudgeted, f"layers without a line budget: {unbudgeted}; add them to BUDGETS"
