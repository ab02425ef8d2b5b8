"""Launching the 2-process workers once per engine (torchrun, gloo, CPU) and sharing their output folders."""

from __future__ import annotations

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


def _run_engine(tmp_path_factory, engine: str) -> Path:
    out = tmp_path_factory.mktemp(f"dist-{engine}")
    torchrun(["-m", "tests.distributed.worker", "--engine", engine, "--out", str(out)])
    return out / engine


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    return _run_engine(tmp_path_factory, "ddp")


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory) -> Path:
    return _run_engine(tmp_path_factory, "fsdp")


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory) -> Path:
    pytest.importorskip(
        "deepspeed", reason="deepspeed is not installed (it is in the test extra); see docs/guides/distributed.md"
    )
    return _run_engine(tmp_path_factory, "zero2")


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory) -> Path:
    pytest.importorskip(
        "deepspeed", reason="deepspeed is not installed (it is in the test extra); see docs/guides/distributed.md"
    )
    return _run_engine(tmp_path_factory, "zero3")


@pytest.fixture
def engine_run(request) -> Path:
    """The output folder of the engine named by the test's ``engine`` parameter."""
    return request.getfixturevalue(f"{request.node.callspec.params['engine']}_run")
