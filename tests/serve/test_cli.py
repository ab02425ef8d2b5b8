"""``python -m peft_swift_ext.serve``'s checks: bad flags and folders exit with 2 and a message naming the flag."""

from __future__ import annotations

import socket

import pytest

from peft_swift_ext.serve.__main__ import main
from peft_swift_ext.serve.settings import FALLBACK_MAX_INPUT_TOKENS, resolve_token_limits

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_main(capsys, serving_files, *extra: str) -> tuple[int, str]:
    model_dir, adapters_dir = serving_files
    code = main(["--model", str(model_dir), "--adapters", str(adapters_dir), "--port", "0", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapters", "/nonexistent/adapters"], "--adapters: /nonexistent/adapters is not a folder"),
        (["--model", "/nonexistent/model"], "--model: /nonexistent/model is not a local folder"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--max-input-tokens", "0"], "--max-input-tokens must be >= 1"),
        (["--max-batch-size", "0"], "--max-batch-size must be an integer >= 1"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a finite number >= 0"),
        (["--batch-wait-ms", "inf"], "--batch-wait-ms must be a finite number >= 0"),
        (["--max-queue", "0"], "--max-queue must be an integer >= 1"),
        (["--port", "70000"], "--port must be in 0..65535"),
        # the tiny model's context is 512 tokens
        (["--max-input-tokens", "400", "--max-new-tokens", "200"], "exceed the model's context length (512)"),
    ],
)
def test_bad_arguments_exit_with_a_message(capsys, serving_files, extra, message):
    code, err = run_main(capsys, serving_files, *extra)
    assert code == 2
    assert message in err


def test_a_port_in_use_is_named(capsys, serving_files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(capsys, serving_files, "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err


def test_token_limits_default_to_what_the_context_leaves():
    assert resolve_token_limits(None, 100, 512) == (412, 100)
    assert resolve_token_limits(None, 100, None) == (FALLBACK_MAX_INPUT_TOKENS, 100)
    assert resolve_token_limits(300, 200, 512) == (300, 200)
