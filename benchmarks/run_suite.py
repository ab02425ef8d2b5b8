"""Benchmark suite: every tuner's training cost, ours next to plain PEFT and ms-swift, plus scaling sweeps.

    python benchmarks/run_suite.py            # full sizes (minutes on a CPU), results in benchmarks/results/
    python benchmarks/run_suite.py --quick    # tiny models, 2 repetitions: the CI smoke run

Writes ``suite.json`` (``suite_quick.json`` with --quick), ``suite.md`` and ``suite_*.png`` charts into
``--output`` (default benchmarks/results). Method, machine and figures: docs/benchmarks.md.

Each configuration (base model, a tuner through PEFT, through ``Swift.prepare_model``, through ms-swift, merged)
lives in its own forked process of a measurement server (benchmarks/suite/worker.py); ms-swift's server runs
under its own interpreter (``--swift-python``, default /work/venv-swift/bin/python), and is skipped with a note
where that interpreter is missing. Within a tuner's group, the configurations take turns step by step
(A B C A B C ...) after one warm-up each, and the figures are medians, so machine load hits all sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.suite import models, plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SWIFT_PYTHON = "/work/venv-swift/bin/python"
# The targets: (figure, bound, source of the figure).
TARGETS = {
    "swift_api_vs_peft_step": 1.02,
    "ours_vs_ms_swift_step": 1.0,
    "ours_vs_ms_swift_overhead": 1.0,
    "merged_vs_base_forward": 1.01,
    "per_thread_vs_shared_forward": 1.05,
    "switch_ms": 1.0,
    "offload_meta_round_trip_ms": 200.0,
}


class Server:
    """Client of one measurement server (``python -m benchmarks.suite.worker SIDE``)."""

    def __init__(self, python: str, side: str, log) -> None:
        self.side = side
        self.process = subprocess.Popen(
            [python, "-m", "benchmarks.suite.worker", side],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            # PASSIVE: an OpenMP thread pool that has just finished must sleep, not spin, or it steals the cores
            # from the configuration timed next in another process.
            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        self.versions = None

    def _ask(self, message: dict):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} server ended (see the log)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.side}: {reply['error']}")
        return reply["ok"]

    def ready(self) -> dict:
        if self.versions is None:
            self.versions = self._answer()["versions"]
        return self.versions

    def open(self, key: str, spec: dict) -> dict:
        return self._ask({"op": "open", "id": key, "spec": spec})

    def call(self, key: str, cmd: str):
        return self._ask({"op": "call", "id": key, "cmd": cmd})

    def close(self, key: str) -> None:
        self._ask({"op": "close", "id": key})

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median of each callable's result over ``repeats`` rounds, all taking turns, after one warm-up each."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


class Group:
    """Configurations that are compared with each other: opened together, timed in turns, closed together."""

    def __init__(self, servers: dict, threads: int) -> None:
        self.servers, self.threads, self.open = servers, threads, {}

    def add(self, name: str, side: str, **spec) -> dict:
        key = f"{name}-{time.monotonic_ns()}"
        info = self.servers[side].open(key, {**spec, "threads": self.threads})
        self.open[name] = (side, key)
        return info

    def call(self, name: str, cmd: str):
        side, key = self.open[name]
        return self.servers[side].call(key, cmd)

    def caller(self, name: str, cmd: str):
        return lambda: self.call(name, cmd)

    def close(self) -> None:
        for side, key in self.open.values():
            self.servers[side].close(key)
        self.open.clear()


def measure_tuner(servers, threads, tuner, family, mergeable, shared, size, repeats) -> dict:
    """Every side of one tuner on one model; save/load take fewer rounds (each load rebuilds a base, untimed)."""
    group = Group(servers, threads)
    variants = {"base": ("ours", {}), "peft": ("ours", {"tuner": tuner, "entry": "peft"})}
    if tuner == "lora":
        variants["swift_api"] = ("ours", {"tuner": tuner, "entry": "swift"})
    if shared and "swift" in servers:
        # ms-swift's venv pins its own transformers, whose model code may be faster or slower than ours: its
        # overhead is taken over the same frozen base run there.
        variants["ms_swift"] = ("swift", {"tuner": tuner})
        variants["ms_swift_base"] = ("swift", {})
    rows = {}
    try:
        for name, (side, spec) in variants.items():
            rows[name] = group.add(name, side, family=family, size=size, **spec)
        steps = interleaved({name: group.caller(name, "step") for name in variants}, repeats)
        for name in variants:
            own_base = "ms_swift_base" if side_of(name) == "swift" else "base"
            rows[name]["step_s"] = steps[name]
            rows[name]["step_vs_base"] = steps[name] / steps[own_base]
            rows[name]["peak_mib"] = group.call(name, "memory") / 2**20
        tuned = [name for name in variants if name not in ("base", "ms_swift_base")]
        io_repeats = min(repeats, 3)
        saves = interleaved({name: group.caller(name, "save") for name in tuned}, io_repeats)
        loads = interleaved({name: group.caller(name, "load") for name in tuned}, io_repeats)
        for name in tuned:
            rows[name].update(save_s=saves[name], load_s=loads[name])
            rows[name]["checkpoint_kib"] = group.call(name, "checkpoint_bytes") / 1024
        if mergeable:
            group.add("merged", "ours", family=family, size=size, tuner=tuner, merged=True)
            forwards = interleaved({name: group.caller(name, "forward") for name in ("base", "merged")}, repeats)
            rows["merged"] = {"forward_s": forwards["merged"], "vs_base": forwards["merged"] / forwards["base"]}
    finally:
        group.close()
    return rows


def side_of(variant: str) -> str:
    """Which measurement server runs a variant of :func:`measure_tuner`."""
    return "swift" if variant.startswith("ms_swift") else "ours"


def measure_scaling(servers, threads, tuner, family, quick, repeats) -> dict:
    curves = {}
    for axis, points in plan.scaling_points(family, quick).items():
        curve = []
        for x, size in points:
            group = Group(servers, threads)
            try:
                info = group.add("tuned", "ours", family=family, size=size, tuner=tuner, entry="peft")
                group.add("base", "ours", family=family, size=size)
                steps = interleaved({name: group.caller(name, "step") for name in ("base", "tuned")}, repeats)
                curve.append(
                    {
                        "x": x,
                        "trainable": info["trainable"],
                        "step_s": steps["tuned"],
                        "step_vs_base": steps["tuned"] / steps["base"],
                        "peak_mib": group.call("tuned", "memory") / 2**20,
                        "base_peak_mib": group.call("base", "memory") / 2**20,
                    }
                )
            finally:
                group.close()
        curves[axis] = curve
    return curves


def run_shim(quick: bool) -> dict:
    """benchmarks/swift_overhead.py's own measurement (SwiftModel vs PEFT, switching, offload), in a fresh process."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import swift_overhead; "
        f"print('@@' + json.dumps(swift_overhead.measure({quick})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line[2:] for line in out.splitlines() if line.startswith("@@")))


def targets(results: dict) -> dict:
    """Every target with the figure measured against it; ``met`` is None where nothing was measured."""
    checks = {}
    lora = results["tuners"]["lora"]
    if "swift_api" in lora:
        checks["swift_api_vs_peft_step"] = lora["swift_api"]["step_s"] / lora["peft"]["step_s"]
    for tuner, rows in results["tuners"].items():
        if "ms_swift" in rows:
            checks[f"ours_vs_ms_swift_step[{tuner}]"] = rows["peft"]["step_s"] / rows["ms_swift"]["step_s"]
            checks[f"ours_vs_ms_swift_overhead[{tuner}]"] = (
                rows["peft"]["step_vs_base"] / rows["ms_swift"]["step_vs_base"]
            )
        if "merged" in rows:
            checks[f"merged_vs_base_forward[{tuner}]"] = rows["merged"]["vs_base"]
    shim = results.get("shim") or {}
    for key, name in (
        ("per_thread_vs_shared_forward", "per_thread_vs_shared_forward"),
        ("switch_ms_median", "switch_ms"),
        ("offload_meta_round_trip_ms_median", "offload_meta_round_trip_ms"),
        ("swift_vs_peft_training_step", "shim_swift_vs_peft_step"),
        ("merged_vs_base_forward", "shim_merged_vs_base_forward"),
    ):
        if key in shim:
            checks[name] = shim[key]
    out = {}
    for name, value in checks.items():
        bound_key = name.split("[")[0].removeprefix("shim_")
        bound_key = {"swift_vs_peft_step": "swift_api_vs_peft_step"}.get(bound_key, bound_key)
        bound = TARGETS[bound_key]
        out[name] = {"measured": round(value, 4), "bound": bound, "met": value <= bound}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 repetitions (CI smoke run)")
    parser.add_argument("--repeats", type=int, help="timed rounds per configuration (default 2 quick, 9 full)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--swift-python", default=os.environ.get("SWIFT_PYTHON", DEFAULT_SWIFT_PYTHON))
    parser.add_argument(
        "--shim",
        choices=("full", "quick", "none"),
        help="benchmarks/swift_overhead.py's size (default: the suite's). Its full size is SmolLM2-135M's shape "
        "with 15 rounds, ~15 min on a loaded 2-core CPU; quick keeps the 30 layers at width 64",
    )
    parser.add_argument("--no-shim", action="store_const", const="none", dest="shim", help="same as --shim none")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--tuners", nargs="+", help="only these tuners (default: all)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 9)
    threads = min(2, os.cpu_count() or 1)
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    # the servers' stderr (library warnings, tracebacks) goes to a log outside the results folder
    log_path = Path(tempfile.gettempdir()) / f"suite{suffix}-{os.getpid()}.log"
    log = open(log_path, "w")  # noqa: SIM115 - the servers write into it until the end
    print(f"server log: {log_path}", flush=True)
    started = time.time()
    servers = {"ours": Server(sys.executable, "ours", log)}
    notes = []
    if Path(args.swift_python).is_file():
        servers["swift"] = Server(args.swift_python, "swift", log)
    else:
        notes.append(f"ms-swift skipped: no interpreter at {args.swift_python} (see tests/fixtures/swift/NOTES.md)")
    versions = {}
    for side, server in list(servers.items()):
        try:
            versions[side] = server.ready()
        except RuntimeError as error:
            notes.append(f"ms-swift skipped: its server failed to start ({error})")
            servers.pop(side)
    sizes = plan.sizes(args.quick)
    results = {
        "quick": args.quick,
        "repeats": repeats,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": threads,
            "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(),
        },
        "versions": versions,
        "models": {family: models.describe(family, size) for family, size in sizes.items()},
        "notes": notes,
        "tuners": {},
        "tuner_notes": {},
        "scaling": {},
    }
    try:
        for tuner, family, mergeable, shared, note in plan.TUNERS:
            if args.tuners and tuner not in args.tuners:
                continue
            begun = time.time()
            rows = measure_tuner(servers, threads, tuner, family, mergeable, shared, sizes[family], repeats)
            results["tuners"][tuner] = rows
            steps = ", ".join(f"{side} {1000 * row['step_s']:.1f} ms" for side, row in rows.items() if "step_s" in row)
            print(f"{tuner} ({family}, {time.time() - begun:.0f} s): {steps}", flush=True)
            results["tuner_notes"][tuner] = {"family": family, "note": note}
        for tuner, family in plan.SCALING_TUNERS:
            if args.tuners and tuner not in args.tuners:
                continue
            begun = time.time()
            # fewer rounds: the sweep shows growth over a 4-8x range, far above the rounds' spread
            results["scaling"][tuner] = measure_scaling(servers, threads, tuner, family, args.quick, min(repeats, 5))
            print(f"scaling {tuner} ({time.time() - begun:.0f} s)", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        log.close()
    shim = args.shim or ("quick" if args.quick else "full")
    if shim != "none":
        print(f"swift_overhead ({shim})", flush=True)
        results["shim"] = {"size": shim, **run_shim(shim == "quick")}
    if "lora" in results["tuners"]:
        results["targets"] = targets(results)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - started, 1)
    (args.output / f"suite{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    from benchmarks.suite import report

    (args.output / f"suite{suffix}.md").write_text(report.markdown(results))
    if not args.no_charts:
        report.charts(results, args.output, suffix)
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
