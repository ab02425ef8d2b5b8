"""Launching the 2-process workers once for all engines (torchrun, gloo, CPU) and sharing their output folders."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def torchrun(args: list[str], cwd: Path = REPO, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 <args>`` on a free port; fails the test on error."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    command += [f"--master_port={free_port()}", *args]
    result = subprocess.run(
        command, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


ENGINES = ("ddp", "fsdp", "zero2", "zero3")  # the order they run in, in one launch


def has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def engines_used(items) -> list[str]:
    """The engines whose runs the selected tests read (by fixture name or ``engine`` parameter)."""
    used = set()
    for item in items:
        names = getattr(item, "fixturenames", ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        used.update(e for e in ENGINES if f"{e}_run" in names or ("engine_run" in names and params.get("engine") == e))
    return [e for e in ENGINES if e in used and (has_deepspeed() or not e.startswith("zero"))]


@pytest.fixture(scope="session")
def engine_runs(request, tmp_path_factory) -> dict[str, Path]:
    """One 2-process launch trains every case under every engine the selected tests need, one after another
    (DeepSpeed's where it is installed): one start-up of the processes instead of one per engine."""
    engines = engines_used(request.session.items)
    out = tmp_path_factory.mktemp("dist")
    if engines:
        torchrun(["-m", "tests.distributed.worker", "--engine", ",".join(engines), "--out", str(out)])
    return {engine: out / engine for engine in engines}


def _engine_folder(engine_runs: dict[str, Path], engine: str) -> Path:
    if engine.startswith("zero"):
        pytest.importorskip(
            "deepspeed", reason="deepspeed is not installed (it is in the test extra); see docs/guides/distributed.md"
        )
    return engine_runs[engine]


@pytest.fixture(scope="session")
def ddp_run(engine_runs) -> Path:
    return _engine_folder(engine_runs, "ddp")


@pytest.fixture(scope="session")
def fsdp_run(engine_runs) -> Path:
    return _engine_folder(engine_runs, "fsdp")


@pytest.fixture(scope="session")
def zero2_run(engine_runs) -> Path:
    return _engine_folder(engine_runs, "zero2")


@pytest.fixture(scope="session")
def zero3_run(engine_runs) -> Path:
    return _engine_folder(engine_runs, "zero3")


@pytest.fixture
def engine_run(request) -> Path:
    """The output folder of the engine named by the test's ``engine`` parameter."""
    return request.getfixturevalue(f"{request.node.callspec.params['engine']}_run")
