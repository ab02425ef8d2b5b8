"""The documentation's code examples run, so they cannot rot.

Convention (also described on the docs page "Running the examples"): a ```python block is *runnable* when the
line before its opening fence is the HTML comment ``<!-- runnable -->`` (invisible in the rendered page). The
runnable blocks of one page run in order, in one namespace, in a fresh temporary working directory; they must be
self-contained (tiny models built from configs, nothing downloaded). Every other ```python block is a sketch
(it may use placeholders such as ``base_model``): it must still compile, and its imports from
``peft_swift_ext`` must resolve.

Every registered tuner and every technique needs a page, and every method page needs at least one runnable
example.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUNNABLE_MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)$")

# Method pages that do not yet carry a runnable example (pages written by the tuners' engineers); each is
# expected to fail the "has a runnable example" check until its example is marked. Remove entries as they are.
PENDING_RUNNABLE: set[str] = set()
# The page of each technique: docs/techniques/NAME.md once the techniques have a page each, else the one
# techniques page.
TECHNIQUES = ["lisa", "galore", "qgalore", "chunked_ce", "liger", "unsloth"]
TECHNIQUE_PAGES = {
    name: f"techniques/{name}.md" if (DOCS / "techniques" / f"{name}.md").exists() else "techniques.md"
    for name in TECHNIQUES
}
FALLBACK_TUNER_PAGES: dict[str, str] = {}


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    source: str
    runnable: bool


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with whether each is marked runnable."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], match["indent"]
        language = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if language not in ("python", "py", "python3"):
            continue
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(
            Block(str(path.relative_to(ROOT)), start + 1, "\n".join(body) + "\n", previous == RUNNABLE_MARKER)
        )
    return blocks


ALL_BLOCKS = [block for page in doc_pages() for block in python_blocks(page)]
RUNNABLE_PAGES = sorted({block.page for block in ALL_BLOCKS if block.runnable})


def _block_id(block: Block) -> str:
    return f"{block.page}:{block.line}"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=_block_id)
def test_every_python_block_compiles_and_its_package_imports_resolve(block: Block):
    tree = ast.parse(block.source, filename=_block_id(block))
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "peft_swift_ext"
    ]
    namespace: dict = {}
    for node in imports:
        exec(compile(ast.Module(body=[node], type_ignores=[]), _block_id(block), "exec"), namespace)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_runnable_examples_of_page_run(page: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    namespace: dict = {"__name__": "__doc_example__"}
    started = time.perf_counter()
    for block in (b for b in ALL_BLOCKS if b.page == page and b.runnable):
        code = compile(block.source, _block_id(block), "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
    assert time.perf_counter() - started < 20, f"{page}: examples must stay small (tiny models)"


def _page_of_tuner(name: str) -> str | None:
    """A tuner's page: ``docs/tuners/NAME.md``; for a technique also registered as a tuner (LISA), its technique
    page (``docs/techniques/NAME.md`` once the techniques have a page each, else ``TECHNIQUE_PAGES``)."""
    candidates = [f"docs/tuners/{name}.md", f"docs/tuners/{name.replace('plus', '_plus')}.md"]
    if name in TECHNIQUE_PAGES:
        candidates.append(f"docs/{TECHNIQUE_PAGES[name]}")
    for candidate in candidates:
        if (ROOT / candidate).exists():
            return candidate.removeprefix("docs/")
    fallback = FALLBACK_TUNER_PAGES.get(name)
    return fallback if fallback and (DOCS / fallback).exists() else None


def _registered_tuners() -> list[str]:
    import peft_swift_ext

    return sorted(peft_swift_ext.TUNERS)


@pytest.mark.parametrize("name", _registered_tuners())
def test_every_registered_tuner_has_a_page(name: str):
    assert _page_of_tuner(name), f"tuner {name!r} has no page docs/tuners/{name}.md"


def _method_pages() -> list[str]:
    pages = {_page_of_tuner(name) or f"tuners/{name}.md" for name in _registered_tuners()}
    pages |= set(TECHNIQUE_PAGES.values())
    return sorted(pages)


@pytest.mark.parametrize("page", _method_pages())
def test_every_method_page_has_a_runnable_example(page: str, request):
    """Tuner pages show both entry points, ``get_peft_model`` and ``Swift.prepare_model``, in runnable code."""
    if page in PENDING_RUNNABLE:
        request.applymarker(pytest.mark.xfail(reason=f"{page}: no example marked {RUNNABLE_MARKER} yet"))
    assert (DOCS / page).exists(), f"docs/{page} is missing"
    runnable = "".join(b.source for b in ALL_BLOCKS if b.page == f"docs/{page}" and b.runnable)
    assert runnable, f"docs/{page} has no python block marked {RUNNABLE_MARKER}"
    if page.startswith("tuners/"):
        for call in ("get_peft_model(", "Swift.prepare_model("):
            assert call in runnable, f"docs/{page}: no runnable example calls {call.rstrip('(')}"


@pytest.mark.parametrize("page", ["docs/index.md", "docs/migration.md"])
def test_entry_pages_have_runnable_examples(page: str):
    assert page in RUNNABLE_PAGES


def test_marker_is_only_used_before_python_blocks():
    """A marker in front of anything else (a bash block, prose) would silently run nothing."""
    for path in doc_pages():
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines):
            if text.strip() != RUNNABLE_MARKER:
                continue
            following = next((t for t in lines[number + 1 :] if t.strip()), "")
            match = FENCE.match(following)
            info = match["info"].strip().lower() if match else ""
            assert info.split(" ")[0] in ("python", "py", "python3"), (
                f"{path.relative_to(ROOT)}:{number + 1}: {RUNNABLE_MARKER} must precede a ```python block"
            )
