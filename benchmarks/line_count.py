"""Lines of ``peft_swift_ext/`` at git revisions: all of them (as ``wc -l`` counts), and code alone.

    python benchmarks/line_count.py b38797f~1 8883259 HEAD

Each line of a ``.py`` file is one of: docstring (a module's, class's or function's first string statement, blank
lines inside it included), comment, blank, or code. Issue 15's figures (the architecture work leaves the package
smaller) come from this script; ``tests/architecture/test_line_budget.py`` holds each layer to its size.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("total", "docstring", "comment", "blank", "code")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def classify(source: str) -> dict[str, int]:
    """How many lines of ``source`` (Python) are of each kind in :data:`KINDS`."""
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        first = node.body[0] if isinstance(node, _DOCUMENTED) and node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = source.splitlines()
    counts = dict.fromkeys(KINDS, 0)
    counts["total"] = len(lines)
    counts["docstring"] = len(docstring_lines)
    for number, line in enumerate(lines, 1):
        if number not in docstring_lines:
            text = line.strip()
            counts["blank" if not text else "comment" if text.startswith("#") else "code"] += 1
    return counts


def count_revision(revision: str, repo: Path = ROOT) -> dict[str, int]:
    """The line counts of every ``.py`` file under ``peft_swift_ext/`` at ``revision`` of the git checkout ``repo``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    totals = dict.fromkeys(KINDS, 0)
    for path in git("ls-tree", "-r", "--name-only", revision, "peft_swift_ext").split():
        if path.endswith(".py"):
            for kind, lines in classify(git("show", f"{revision}:{path}")).items():
                totals[kind] += lines
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+", help="git revisions to count (e.g. HEAD, a commit, main~3)")
    for revision in parser.parse_args(argv).revisions:
        counts = count_revision(revision)
        print(f"{revision:>14}  " + "  ".join(f"{kind} {counts[kind]:6d}" for kind in KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
