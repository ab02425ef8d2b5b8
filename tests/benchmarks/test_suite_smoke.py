"""The benchmark suite's quick run: every tuner and every figure present and sane, so the suite cannot rot.

Nothing here asserts on speed: timings on a shared CI machine are noise. The ms-swift side runs only where its
virtual environment exists (``SWIFT_PYTHON`` or /work/venv-swift); elsewhere the suite records a note instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.suite import plan  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("suite")
    # --no-shim: benchmarks/swift_overhead.py has its own quick mode; running it here would double the time.
    command = [sys.executable, "benchmarks/run_suite.py", "--quick", "--no-shim", "--output", str(output)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    return output, json.loads((output / "suite_quick.json").read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_tuner_has_every_figure(quick_run):
    _, result = quick_run
    assert list(result["tuners"]) == [name for name, *_ in plan.TUNERS]
    for name, _family, mergeable, _shared, _ in plan.TUNERS:
        rows = result["tuners"][name]
        assert rows["base"]["trainable"] == 0
        for side in ("peft", "swift_api", "ms_swift"):
            if side not in rows:
                continue
            row = rows[side]
            for key in ("step_s", "step_vs_base", "save_s", "load_s", "checkpoint_kib"):
                assert positive(row[key]), (name, side, key, row[key])
            assert row["peak_mib"] >= 0
            # NEFTune has no weights; every other tuner trains a small part of the model
            assert (row["trainable"] == 0) == (name == "neftune"), (name, side)
            assert row["trainable"] < row["total"]
        assert ("merged" in rows) == mergeable
        if mergeable:
            assert positive(rows["merged"]["vs_base"])
    assert "swift_api" in result["tuners"]["lora"]


def test_ms_swift_side_or_a_note(quick_run):
    _, result = quick_run
    if "swift" not in result["versions"]:
        assert any("ms-swift skipped" in note for note in result["notes"])
        return
    for name, _, _, shared, _ in plan.TUNERS:
        assert ("ms_swift" in result["tuners"][name]) == shared, name
        if shared:
            # the same tuner on the same model trains the same number of parameters on both sides
            ours, theirs = result["tuners"][name]["peft"], result["tuners"][name]["ms_swift"]
            assert ours["trainable"] == theirs["trainable"], name


def test_scaling_and_reports(quick_run):
    output, result = quick_run
    for tuner, _ in plan.SCALING_TUNERS:
        for axis in ("sequence", "width"):
            points = result["scaling"][tuner][axis]
            assert len(points) >= 3
            assert [p["x"] for p in points] == sorted(p["x"] for p in points)
            assert all(positive(p["step_s"]) and p["peak_mib"] >= 0 for p in points)
    assert "swift_api_vs_peft_step" in result["targets"]
    table = (output / "suite_quick.md").read_text()
    assert all(f"| {name} |" in table for name, *_ in plan.TUNERS)
    for chart in ("step_ratio", "memory", "scaling"):
        assert (output / f"suite_quick_{chart}.png").stat().st_size > 0


def test_ms_swift_worker_needs_nothing_from_this_package():
    """build_swift must stay importable under ms-swift's venv, which does not have peft_swift_ext."""
    source = (ROOT / "benchmarks" / "suite" / "build_swift.py").read_text()
    shared = [(ROOT / "benchmarks" / "suite" / name).read_text() for name in ("worker.py", "models.py")]
    for text in (source, *shared):
        assert "peft_swift_ext" not in text
    assert os.path.isfile(ROOT / "benchmarks" / "suite" / "build_ours.py")
