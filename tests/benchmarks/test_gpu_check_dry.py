"""benchmarks/gpu_check.py --dry-run: every check has its row, what ran is within tolerance, CUDA-only rows say so.

The dry run is the GPU check's own code on the CPU at tiny sizes (bf16 / fp16 under CPU autocast against float32),
so the script cannot rot between the rare runs on a GPU. Nothing here asserts on time or memory figures.
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
# The tuners the check must cover (the task's list, written out here rather than read from the script), with the
# model family each runs on, and the LoRA reference rows.
TUNERS = {
    "loraplus": "llama", "adapter": "llama", "prompt": "bert", "side": "bert", "restuning": "vit",
    "scedit": "unet", "llamapro": "llama", "longlora": "llama", "neftune": "llama", "lisa": "llama",
}  # fmt: skip
FAMILIES = ("llama", "bert", "vit", "unet")
NEEDS_CUDA = {"liger-llama", "liger-undo", "galore-adamw8bit"}
TECHNIQUES = {"galore-adamw", "qgalore", "qgalore-int8", "neftune-noise"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    out, md = folder / "dry.json", folder / "dry.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--md", str(md)]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), process.stdout[-3000:] + process.stderr[-3000:]
    result = json.loads(out.read_text())
    return process, result, {row["check"]: row for row in result["rows"]}, md.read_text()


def expected_checks() -> set[str]:
    tuners = {f"{name}-{family}" for name, family in TUNERS.items()} | {f"lora-{family}" for family in FAMILIES}
    return {f"{t}/{dtype}" for t in tuners for dtype in ("bf16", "fp16")} | NEEDS_CUDA | TECHNIQUES


def test_every_check_has_exactly_one_row(dry_run):
    _, result, rows, _ = dry_run
    assert len(rows) == len(result["rows"]), "a check appears twice"
    assert set(rows) == expected_checks()
    assert list(result["summary"]) == [row["check"] for row in result["rows"]]


def test_cuda_only_rows_are_marked_skipped(dry_run):
    _, _, rows, _ = dry_run
    for check in NEEDS_CUDA:
        assert rows[check]["status"] == "skipped: needs CUDA", (check, rows[check]["status"])


def test_every_row_that_ran_passes_within_its_tolerance(dry_run):
    process, _, rows, _ = dry_run
    ran = {check: row for check, row in rows.items() if check not in NEEDS_CUDA}
    for check, row in ran.items():
        assert row["status"] == "pass", (check, row["status"], row["details"].get("traceback", "")[-2000:])
        assert row["metrics"], check
        for metric in row["metrics"]:
            assert math.isfinite(metric["value"]) and metric["value"] <= metric["tolerance"], (check, metric)
    assert process.returncode == 0, process.stdout[-3000:]


def test_tuner_rows_compare_the_steps_and_carry_ratios_against_lora(dry_run):
    _, result, rows, _ = dry_run
    steps = result["settings"]["steps"]
    for check, row in rows.items():
        if "/" not in check:
            continue
        name, dtype = check.split("/")
        family = name.split("-")[1]
        details = row["details"]
        assert len(details["device_losses"]) == len(details["cpu_fp32_losses"]) == steps, check
        assert details["device_losses"] != details["cpu_fp32_losses"], f"{check}: half precision changed nothing"
        assert row["ratio_reference"] == f"lora-{family}/{dtype}"
        assert row["step_ratio"] > 0 and row["memory_ratio"] > 0, check
        if name.startswith("lora-"):
            assert row["step_ratio"] == row["memory_ratio"] == 1.0


def test_half_precision_recipes(dry_run):
    _, _, rows, _ = dry_run
    # fp16 trains float32 weights (GradScaler cannot unscale fp16 gradients); bf16 keeps LISA's layers in bf16.
    for check, row in rows.items():
        if check.endswith("/fp16"):
            assert row["details"]["trainable_dtypes"] == ["torch.float32"], check
    assert rows["lisa-llama/bf16"]["details"]["trainable_dtypes"] == ["torch.bfloat16"]


def test_optimizer_rows_hold_state_ratios_against_galore(dry_run):
    _, _, rows, _ = dry_run
    assert rows["galore-adamw"]["memory_ratio"] == 1.0
    for check in ("qgalore", "qgalore-int8"):
        # bf16 moments and an INT4 projection hold less state than galore-torch's float32 ones.
        assert 0 < rows[check]["memory_ratio"] < 1, (check, rows[check]["memory_ratio"])


def test_markdown_report_lists_every_row_and_the_versions(dry_run):
    _, result, rows, md = dry_run
    assert "dry-run" in md and f"torch {result['versions']['torch']}" in md
    for check, row in rows.items():
        assert f"| {check} | " in md, check
        assert row["status"] in md
