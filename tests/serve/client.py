"""A tiny HTTP client for the server tests (the standard library only), and the server as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"on http://127\.0\.0\.1:(\d+)")


def request(url: str, body: bytes | dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    """``(status, decoded JSON)`` of a GET (no body) or a POST (a dict is sent as JSON, bytes as they are)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class ServerProcess:
    """``python -m peft_swift_ext.serve ...`` on a free port; use as a context manager (always terminated)."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "peft_swift_ext.serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self._log = open(self.log_path, "w")  # closed in __exit__
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.url = self._wait_until_healthy(timeout=180)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_healthy(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            match = LISTENING.search(self.log())
            if match:
                # the line comes once the socket listens: the first connection is accepted, with no retry
                url = f"http://127.0.0.1:{match.group(1)}"
                status, answer = request(url + "/health", timeout=60)
                if status != 200:
                    raise RuntimeError(f"/health answered {status}: {answer}\n{self.log()}")
                return url
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def send_together(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST every body from its own thread, all released at once."""
    barrier = threading.Barrier(len(bodies))
    results: list = [None] * len(bodies)

    def send(index: int) -> None:
        barrier.wait()
        results[index] = request(url + "/v1/completions", bodies[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results
