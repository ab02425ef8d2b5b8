"""A batch that fails answers its own requests with a 500 saying why; the server goes on (no model needed)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from peft_swift_ext.serve.app import create_app  # noqa: E402
from peft_swift_ext.serve.engine import BASE_MODEL_NAME, Completion, Row  # noqa: E402
from peft_swift_ext.serve.settings import ServeSettings  # noqa: E402

from .client import request, send_together  # noqa: E402

# Small, so the refused body fits in the socket buffers: a large one could be cut off by the server's answer
# while the client is still sending, and the client would see a reset connection instead of the 413.
BODY_LIMIT = 4096


class FakeEngine:
    """Echoes each prompt back, reversed; a batch holding a request for ``fragile`` raises."""

    adapters = {"steady": "FAKE", "fragile": "FAKE"}
    backend = "fake"
    model_names = [BASE_MODEL_NAME, *adapters]

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def encode(self, prompt):
        return [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)

    def check_token_ids(self, ids):
        pass

    def generate(self, rows: list[Row]) -> list[Completion]:
        self.batches.append([row.adapter for row in rows])
        if any(row.adapter == "fragile" for row in rows):
            raise RuntimeError("the fragile adapter produced NaNs")
        return [
            Completion(row.prompt_ids[::-1], "".join(map(chr, row.prompt_ids[::-1])), "length", len(row.prompt_ids), 1)
            for row in rows
        ]


@pytest.fixture
def fake_server():
    engine = FakeEngine()
    settings = ServeSettings(
        max_batch_size=2, batch_wait_ms=2000, max_input_tokens=50, max_new_tokens=8, max_body_bytes=BODY_LIMIT
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_a_failing_batch_gets_500s_and_the_next_batch_is_served(fake_server):
    url, engine = fake_server
    # max_batch_size 2 and a long window: these two run as one batch, which fails
    failed = send_together(url, [{"model": "fragile", "prompt": "abc"}, {"model": "steady", "prompt": "xyz"}])
    assert len(engine.batches) == 1 and sorted(engine.batches[0]) == ["fragile", "steady"]
    for status, answer in failed:
        assert status == 500
        assert answer["error"]["type"] == "server_error"
        assert "RuntimeError: the fragile adapter produced NaNs" in answer["error"]["message"]

    served = send_together(url, [{"model": "steady", "prompt": "abc"}, {"model": BASE_MODEL_NAME, "prompt": "xyz"}])
    assert [(status, answer["choices"][0]["text"]) for status, answer in served] == [(200, "cba"), (200, "zyx")]
    _, metrics = request(url + "/metrics")
    assert (metrics["failed_batches"], metrics["failed"], metrics["completed"]) == (1, 2, 2)
    assert request(url + "/health")[1]["status"] == "ok"


def test_a_body_over_the_limit_gets_413(fake_server):
    url, _ = fake_server
    status, answer = request(url + "/v1/completions", b'{"model": "steady", "prompt": "' + b"x" * BODY_LIMIT + b'"}')
    assert status == 413 and f"the limit is {BODY_LIMIT}" in answer["error"]["message"]
    assert request(url + "/v1/completions", {"model": "steady", "prompt": "ok"})[0] == 200
