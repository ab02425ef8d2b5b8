"""Every tuner page (docs/tuners/*.md) has the sections a user looks for.

- an introduction before the first ``##`` heading that explains the method and says when to choose it over
  LoRA (it names LoRA);
- what merges and what does not (a ``**Merge...**`` paragraph, or ``merge_and_unload`` explained);
- a ``## Measured`` section with figures: an embedded results file (``<!-- benchmark: NAME -->``), the tuner's
  benchmark-suite rows (``<!-- suite: NAME -->``) or a table, each embed naming results that exist.

The config table (every field with its default) and the runnable examples through ``get_peft_model`` and
``Swift.prepare_model`` are checked by test_config_tables.py and test_doc_examples.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "tuners").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"


def _sections(text: str) -> tuple[str, dict[str, str]]:
    parts = re.split(r"^## +(.+)$", text, flags=re.MULTILINE)
    return parts[0], {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tuner_page_has_the_required_sections(page: Path):
    text = page.read_text(encoding="utf-8")
    intro, sections = _sections(text)
    assert re.search(r"\bLoRA\b", intro), f"{page.name}: the introduction does not say when to choose it over LoRA"
    assert len(intro.split()) >= 40, f"{page.name}: the introduction is too short to explain the method"
    assert re.search(r"\*\*(Merge|Saving / merging)", text) or "merge_and_unload" in text, (
        f"{page.name}: no paragraph on what merges"
    )
    measured = [body for title, body in sections.items() if title.startswith("Measured")]
    assert measured, f"{page.name}: no '## Measured' section"
    body = "".join(measured)
    has_figures = re.search(r"<!--\s*(benchmark|benchmark-chart|suite):", body) or re.search(
        r"^\|.*\|\s*$", body, re.MULTILINE
    )
    assert has_figures, f"{page.name}: the Measured section has no figures (embed or table)"


def test_embeds_name_existing_results():
    suite = json.loads((RESULTS / "suite.json").read_text())
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for name in re.findall(r"<!--\s*benchmark(?:-chart)?:\s*([\w.-]+)\s*-->", text):
            assert (RESULTS / f"{name}.json").exists(), f"{page.name}: benchmarks/results/{name}.json is missing"
        for name in re.findall(r"<!--\s*suite:\s*([\w.-]+)\s*-->", text):
            assert name in suite["tuners"], f"{page.name}: suite.json has no tuner {name!r}"
