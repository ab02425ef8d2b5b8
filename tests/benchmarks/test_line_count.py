"""benchmarks/line_count.py: each line gets exactly one kind, and a revision is counted."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.line_count import classify, count_revision  # noqa: E402

SOURCE = '''"""Module docstring,

over three lines."""

import os  # a trailing comment counts as code


class Thing:
    """One line."""

    # a comment line
    def method(self):
        return os.sep
'''


def test_each_line_is_one_kind():
    counts = classify(SOURCE)
    assert counts == {"total": 13, "docstring": 4, "comment": 1, "blank": 4, "code": 4}
    assert counts["total"] == sum(counts[kind] for kind in ("docstring", "comment", "blank", "code"))


def test_head_is_counted_over_the_package():
    counts = count_revision("HEAD")
    assert counts["code"] > 1000
    assert counts["total"] == sum(counts[kind] for kind in ("docstring", "comment", "blank", "code"))
