"""Concurrency soak at full size: 8 threads x 500 forwards on a per-thread-activation model, each thread
switching among its own adapters at random, while an offloader thread moves the inactive adapters of a
shared-mode model to cpu/meta and back under those threads' forwards on it.

It counts outputs that differ from single-thread references (must be 0), errors (must be 0) and resident
memory before and after (must be within 5%). ``tests/reliability/soak_engine.py`` holds the soak itself;
``tests/reliability/test_concurrency_soak.py`` runs it at CI size.

Run: ``python benchmarks/soak.py [--threads 8 --forwards 500 --repeat 1]`` (writes ``benchmarks/results/soak.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the soak lives in the test package, which is not installed

from tests.reliability.soak_engine import run_soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--forwards", type=int, default=500)
    parser.add_argument("--per-thread", type=int, default=2, help="adapters each thread owns")
    parser.add_argument("--offloadable", type=int, default=3, help="inactive adapters of the shared model")
    parser.add_argument("--repeat", type=int, default=1, help="soaks in a row, with different seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()

    runs = []
    for seed in range(args.repeat):
        result = run_soak(args.threads, args.forwards, args.per_thread, args.offloadable, seed=seed)
        run = {
            "seed": seed,
            "forwards": result.forwards,
            "shared_model_forwards": result.shared_forwards,
            "offload_cycles": result.offloads,
            "mismatches": len(result.mismatches),
            "errors": result.errors,
            "rss_before_mib": round(result.rss_before / 2**20, 1),
            "rss_after_mib": round(result.rss_after / 2**20, 1),
            "rss_growth_percent": round(100 * result.rss_growth, 2),
            "seconds": round(result.seconds, 1),
        }
        runs.append(run)
        print(json.dumps(run), flush=True)
        for line in result.mismatches[:10]:
            print("  mismatch:", line)
    ok = all(r["mismatches"] == 0 and not r["errors"] and abs(r["rss_growth_percent"]) <= 5 for r in runs)
    import torch

    report = {
        "threads": args.threads,
        "forwards_per_thread": args.forwards,
        "adapters_per_thread": args.per_thread,
        "offloadable_adapters": args.offloadable,
        "runs": runs,
        "passed": ok,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("PASSED" if ok else "FAILED", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
