"""The package's GPU paths in one run: Liger Kernel, GaLore 8-bit, Q-GaLore and every tuner in bf16 / fp16 on CUDA.

Each row is one check with its measured errors against a reference computed another way (a CPU float32 run of the
same steps, the unpatched model, 32-bit GaLore) and the tolerance each must meet; step time and peak memory are
ratios against a named reference in the same run (plain PEFT LoRA on the same model, the unpatched model, 32-bit
GaLore). Prints a Markdown table and writes the same rows as JSON (``--out``), rewritten after every section so a
run cut short still leaves its rows.

Run (one CUDA GPU, a few minutes):
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json --md benchmarks/results/gpu_check.md
Dry run (CPU, tiny sizes, CUDA-only parts marked "skipped: needs CUDA"; what tests/benchmarks runs):
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: gpucheck and peak_memory
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository: peft_swift_ext

import torch  # noqa: E402
from gpucheck import models  # noqa: E402
from gpucheck.common import Row  # noqa: E402

SECTIONS = ("liger", "optimizers", "tuners", "neftune-noise")
MODES = {
    "gpu": {
        "check": "check", "bench": "bench", "steps": 4, "warmup": 3, "repeats": 10,
        "optimizer_size": {"hidden": 256, "layers": 2, "heads": 4, "vocab": 2048, "batch": 2, "seq": 128},
        "optimizer_steps": 8, "rank": 32, "gap": 4,
    },
    "dry": {
        "check": "dry", "bench": "dry", "steps": 3, "warmup": 1, "repeats": 2,
        "optimizer_size": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 128, "batch": 2, "seq": 16},
        "optimizer_steps": 3, "rank": 8, "gap": 2,
    },
}  # fmt: skip
PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "diffusers", "triton", "liger_kernel", "galore-torch",
    "bitsandbytes", "huggingface_hub", "peft-swift-ext",
)  # fmt: skip


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["peft_swift_ext_commit"] = source_commit()
    found["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["gpu"] = props.name
        found["capability"] = f"{props.major}.{props.minor}"
        found["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        found["multiprocessors"] = props.multi_processor_count
    return found


def source_commit() -> str | None:
    """The package's commit: a COMMIT file beside benchmarks/ (a copied tree has no .git), else git's HEAD."""
    root = Path(__file__).resolve().parents[1]
    if (root / "COMMIT").is_file():
        return (root / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def summary(rows: list[dict]) -> dict:
    """One line per check (what the docs render as a table): result, worst error over tolerance, cost ratios."""
    out = {}
    for row in rows:
        fractions = [m["value"] / m["tolerance"] for m in row["metrics"] if m["tolerance"] > 0]
        out[row["check"]] = {
            "result": row["status"],
            "worst error / tolerance": max(fractions) if fractions else None,
            "step ×ref": row["step_ratio"],
            "memory ×ref": row["memory_ratio"],
            "ratio reference": row["ratio_reference"],
        }
    return out


def format_metrics(row: dict) -> str:
    return "; ".join(
        f"{m['name']} {m['value']:.2g}{'≤' if m['ok'] else ' > '}{m['tolerance']:.2g}" for m in row["metrics"]
    )


def ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| check | what ran | result | error ≤ tolerance | step ×ref | mem ×ref | ratio reference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        status = row["status"].replace("|", "/")
        cells = [row["check"], row["what"], status, format_metrics(row), ratio(row["step_ratio"])]
        cells += [ratio(row["memory_ratio"]), row["ratio_reference"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> dict:
    mode = MODES["dry" if args.dry_run else "gpu"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    # float32 means float32 on both sides of every float32 comparison (cuBLAS and cuDNN would otherwise use TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    check_size, bench_size = models.SIZES[mode["check"]], models.SIZES[mode["bench"]]
    sections = args.only or SECTIONS
    result = {
        "mode": "dry-run (CPU; timings are not figures)" if args.dry_run else "gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "sizes": {"check": check_size, "bench": bench_size, "optimizers": mode["optimizer_size"]},
        "settings": {k: v for k, v in mode.items() if k not in ("check", "bench", "optimizer_size")},
        "rows": [],
        "section_seconds": {},
    }
    print(json.dumps({"versions": result["versions"], "mode": result["mode"]}), flush=True)
    started = time.perf_counter()

    def log(new_rows: list[Row]) -> None:
        for row in new_rows:
            result["rows"].append(row.to_json())
            print(
                f"[{time.perf_counter() - started:6.1f}s] {row.check}: {row.status}  {format_metrics(row.to_json())}"
            )
        if args.out:
            result["elapsed_s"] = time.perf_counter() - started
            Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")

    for section in sections:
        begun = time.perf_counter()
        if section == "liger":
            from gpucheck.liger import liger_rows

            log(liger_rows(device, check_size["llama"], bench_size["llama"], mode["warmup"], mode["repeats"]))
        elif section == "optimizers":
            from gpucheck.optimizers import optimizer_rows

            size, steps = mode["optimizer_size"], mode["optimizer_steps"]
            rows = optimizer_rows(device, size, steps, mode["rank"], mode["gap"], mode["warmup"], mode["repeats"], log)
            # The ratios are filled in after every run of the section; rewrite its rows with them.
            checks = {row.check for row in rows}
            result["rows"] = [r for r in result["rows"] if r["check"] not in checks] + [r.to_json() for r in rows]
            log([])
        elif section == "tuners":
            from gpucheck.tuners import tuner_rows

            dtypes = [torch.bfloat16, torch.float16]
            tuner_rows(device, dtypes, check_size, bench_size, mode["steps"], mode["warmup"], mode["repeats"], log)
        elif section == "neftune-noise":
            from gpucheck.tuners import neftune_noise_rows

            log(neftune_noise_rows(device, {**check_size["llama"], "seq": 128}))
        result["section_seconds"][section] = round(time.perf_counter() - begun, 1)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only parts are skipped")
    parser.add_argument("--out", help="write the rows and versions as JSON here")
    parser.add_argument("--md", help="write the Markdown table (with date, versions and command) here")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # library deprecation chatter would bury the table
    result = run(args)
    result["summary"] = summary(result["rows"])
    table = markdown_table(result["rows"])
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.md:
        Path(args.md).write_text(markdown_report(result, table))
    bad = [
        r["check"] for r in result["rows"] if r["status"] not in ("pass",) and not r["status"].startswith("skipped")
    ]
    print(f"\n{len(result['rows'])} rows, {len(bad)} not passing{': ' + ', '.join(bad) if bad else ''}; "
          f"{result['elapsed_s']} s")  # fmt: skip
    return 1 if bad else 0


def markdown_report(result: dict, table: str) -> str:
    v = result["versions"]
    device = f"{v.get('gpu')} (compute capability {v.get('capability')})" if v.get("gpu") else "CPU"
    lines = [
        "# GPU check",
        "",
        f"{result['date']} · {result['mode']} · {device} · CUDA {v.get('cuda')}",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("gpu", "capability") and val),
        "",
        f"Command: `{result['command']}` ({result['elapsed_s']} s)",
        "",
        *([f"Run on: {result['run_on']}", ""] if result.get("run_on") else []),
        "Sizes: " + "; ".join(f"{name}: {json.dumps(sizes)}" for name, sizes in result["sizes"].items()),
        "",
        "Settings: " + json.dumps(result["settings"]),
        "",
        table,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
