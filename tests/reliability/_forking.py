"""Running a function in a forked child: to kill it mid-save, to limit its resources, or to bound a hang.

A fork shares everything already imported, so a child costs milliseconds where a fresh interpreter would
spend seconds importing torch. The child runs single-threaded and reports through a pipe; it never returns
into pytest (it leaves with ``os._exit``).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from dataclasses import dataclass

import torch

#: The exit status of a child that a test killed on purpose (see :func:`crash_on_file_operation`).
CRASHED = 77


@dataclass
class ChildResult:
    """How a child ended: its exit status, what it returned or the error it raised, and whether it hung."""

    status: int | None
    value: object = None
    error: str | None = None
    hung: bool = False


def run_in_child(function, *args, timeout: float = 120.0) -> ChildResult:
    """Run ``function(*args)`` in a forked child; a child still running after ``timeout`` seconds is killed.

    ``timeout`` is a guard against hangs (the thing some tests check does not happen), not a measurement.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        try:
            torch.set_num_threads(1)
            payload = ("value", function(*args))
        except BaseException as error:  # reported to the parent, which decides
            payload = ("error", f"{type(error).__name__}: {error}")
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(payload))
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline, hung = [], time.monotonic() + timeout, False
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                hung = True
                break
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    result = ChildResult(os.waitstatus_to_exitcode(status), hung=hung)
    if chunks:
        kind, content = pickle.loads(b"".join(chunks))
        setattr(result, kind, content)
    return result


def crash_on_file_operation(n: int) -> None:
    """Make this process die (``os._exit``, as a SIGKILL or a power cut would stop it) at its ``n``-th file-system
    change: creating, writing, renaming or removing a file or folder.

    The primitives are patched rather than the package's own hook, so the same test runs against any
    implementation of saving. Call it in a child only.
    """
    import pathlib
    import shutil
    import tempfile

    import safetensors.torch

    from peft_swift_ext.core import files

    calls = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os._exit(CRASHED)
            return original(*args, **kwargs)

        return wrapper

    for owner, name in [
        (os, "replace"),
        (os, "rename"),
        (os, "mkdir"),
        (os, "unlink"),
        (os, "rmdir"),
        (shutil, "rmtree"),
        (tempfile, "mkdtemp"),
        (pathlib.Path, "write_text"),
        (pathlib.Path, "write_bytes"),
        (safetensors.torch, "save_file"),
        (files, "save_file"),
        (torch, "save"),
    ]:
        setattr(owner, name, counted(getattr(owner, name)))


def killed_at(step: int, function, *args):
    """Run ``function(*args)``, dying at its ``step``-th file-system change (:func:`crash_on_file_operation`)."""
    crash_on_file_operation(step)
    return function(*args)
