"""The serving benchmark's quick run: every tuner and the PEFT anchor measured, so the benchmark cannot rot.

Nothing here asserts on speed (timings on a shared CI machine are noise), only that each figure exists and is a
real measurement.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.swift_overhead import smollm2_shaped  # noqa: E402


def test_quick_run_measures_every_tuner_and_the_anchor(tmp_path):
    output = tmp_path / "serving.json"
    command = [sys.executable, "benchmarks/serving.py", "--quick", "--output", str(output)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(output.read_text())
    expected = {
        "peft_lora (anchor)",
        "lora",
        "lora_plus",
        "adapter",
        "prompt",
        "side",
        "restuning",
        "llamapro",
        "llamapro (use_cache=False)",
        "scedit (UNet)",
    }
    assert set(result["results"]) == expected
    for tuner, figures in result["results"].items():
        one, mixed = figures["seconds"]["one_adapter"], figures["seconds"]["mixed"]
        assert all(math.isfinite(value) and value > 0 for value in (one, mixed)), tuner
        assert figures["ratio"] == mixed / one, tuner
    # the description names the base the LLM tuners ran on, not the config LLaMA-PRO's blocks grew
    layers = smollm2_shaped(quick=True).num_hidden_layers
    assert result["model"].startswith(f"Llama {layers} layers,"), result["model"]
