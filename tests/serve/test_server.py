"""The server as a real subprocess: concurrent requests for different adapters batch together and each answer
equals the request run alone; every kind of bad request gets its 4xx and the server keeps answering."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from peft_swift_ext.serve.engine import BASE_MODEL_NAME, Row  # noqa: E402

from .client import ServerProcess, request, send_together  # noqa: E402
from .reference import alone, reference_model  # noqa: E402

CONCURRENT = 8
MAX_NEW_TOKENS = 12
MAX_INPUT_TOKENS = 40


@pytest.fixture(scope="module")
def server(serving_files, tmp_path_factory):
    model_dir, adapters_dir = serving_files
    args = ["--model", str(model_dir), "--adapters", str(adapters_dir), "--max-batch-size", str(CONCURRENT)]
    args += ["--device", "cpu"]  # where the reference runs: the same arithmetic on a machine with a GPU too
    # A long window: the batch closes as soon as all CONCURRENT requests are in, so the window only bounds a
    # straggler's wait; requests sent one at a time each wait it out, so the bad-request checks (which never
    # reach the batcher) come first.
    args += ["--batch-wait-ms", "1500", "--max-input-tokens", str(MAX_INPUT_TOKENS)]
    args += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    with ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log") as running:
        yield running


def test_models_and_health(server):
    status, models = request(server.url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["adapter_type"]) for m in models["data"]] == [
        (BASE_MODEL_NAME, None),
        ("alpha", "LORA"),
        ("beta", "ADAPTER"),
        ("gamma", "PROMPT"),
    ]
    status, health = request(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "swift"


BAD_REQUESTS = [
    # (body, status, the field the message must name, a phrase of the message)
    ({"model": "delta", "prompt": "hi"}, 404, "model", "no adapter named 'delta'"),
    ({"model": "alpha", "prompt": "x" * (MAX_INPUT_TOKENS + 1)}, 400, "prompt", f"at most {MAX_INPUT_TOKENS}"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": MAX_NEW_TOKENS + 1}, 400, "max_tokens", "at most"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"model": "alpha", "prompt": 7}, 400, "prompt", "a string or a list of integer token ids"),
    ({"model": "alpha", "prompt": [1, "2"]}, 400, "prompt", "token ids must be integers"),
    ({"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ({"model": "alpha", "prompt": [5, 100000]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "alpha", "prompt": []}, 400, "prompt", "empty"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": "4"}, 400, "max_tokens", "must be an integer"),
    ({"model": ["alpha"], "prompt": "hi"}, 400, "model", "must be a string"),
    ({"prompt": "hi"}, 400, "model", "is required"),
    ({"model": "alpha"}, 400, "prompt", "is required"),
    ({"model": "alpha", "prompt": "hi", "temperature": 0.7}, 400, "temperature", "greedy"),
    ({"model": "alpha", "prompt": "hi", "n": 2}, 400, "n", "one completion"),
    ({"model": "alpha", "prompt": "hi", "stream": True}, 400, "stream", "streaming"),
    ({"model": "alpha", "prompt": "hi", "stop": ["\n"]}, 400, "stop", "stop sequences"),
    ({"model": "alpha", "prompt": "hi", "adapter": "beta"}, 400, "adapter", "not a field"),
    (b'{"model": "alpha", "prompt": "hi",', 400, None, "not valid JSON"),
    (b'["alpha", "hi"]', 400, None, "must be a JSON object"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    # 200 KB, under the size limit, nested deeper than Python's JSON decoder recurses
    (b'{"model": "alpha", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "nested"),
]


@pytest.mark.parametrize(("body", "status", "param", "phrase"), BAD_REQUESTS, ids=lambda v: None)
def test_a_bad_request_gets_a_4xx_naming_the_field(server, body, status, param, phrase):
    code, answer = request(server.url + "/v1/completions", body)
    error = answer["error"]
    assert (code, error["param"]) == (status, param), answer
    assert phrase in error["message"]
    if param is not None:
        assert f"'{param}'" in error["message"]


def test_concurrent_requests_batch_together_and_equal_each_alone(server, serving_files):
    _, before = request(server.url + "/metrics")
    names = [BASE_MODEL_NAME, "alpha", "beta", "gamma"]
    prompts = ["Hello there", "a", "The quick brown fox", "x = 1 + 2"]
    bodies = [
        {"model": names[i % 4], "prompt": prompts[(i // 4 + i) % 4], "max_tokens": 3 + i}
        for i in range(CONCURRENT - 1)
    ]
    bodies.append({"model": "beta", "prompt": [12, 40, 41, 77], "max_tokens": MAX_NEW_TOKENS})
    answers = send_together(server.url, bodies)

    from peft_swift_ext.serve.loading import load_engine

    engine = load_engine(*serving_files)  # for its tokenizer and end-of-sequence ids; the reference does not batch
    model = reference_model(serving_files)
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200, answer
        prompt = tuple(engine.encode(body["prompt"]))
        expected = alone(model, engine, Row(body["model"], prompt, body["max_tokens"]))
        (choice,) = answer["choices"]
        assert answer["object"] == "text_completion" and answer["model"] == body["model"]
        assert choice["text"] == engine.tokenizer.decode(expected, skip_special_tokens=True), body
        assert choice["finish_reason"] == ("length" if len(expected) == body["max_tokens"] else "stop")
        usage = answer["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        assert usage["completion_tokens"] == len(expected) + (choice["finish_reason"] == "stop")
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len({answer["id"] for _, answer in answers}) == CONCURRENT

    _, after = request(server.url + "/metrics")
    assert after["requests"] - before["requests"] == CONCURRENT
    # batching happened: fewer generate calls than requests, and at least one batch mixed adapters
    assert after["batches"] - before["batches"] < CONCURRENT
    assert after["mixed_adapter_batches"] > before["mixed_adapter_batches"]
    assert after["max_batch_size_seen"] > 1


def test_the_server_still_answers_after_bad_requests(server):
    code, _ = request(server.url + "/v1/completions", b"not json")
    assert code == 400
    code, answer = request(
        server.url + "/v1/completions", {"model": "gamma", "prompt": "still here?", "max_tokens": 2}
    )
    assert code == 200 and answer["usage"]["completion_tokens"] <= 2
    _, metrics = request(server.url + "/metrics")
    assert metrics["rejected"]["400"] >= len([b for b in BAD_REQUESTS if b[1] == 400]) + 1
    assert metrics["rejected"]["404"] >= 1 and metrics["failed"] == 0
