"""Request and response bodies of ``/v1/completions`` (the OpenAI completions format, greedy decoding only).

Types are strict (``"5"`` is not a number, ``true`` is not a token id) and unknown fields are refused, so a
client never gets silently different behaviour from what it asked for. Sampling options that this server cannot
honour (``temperature`` > 0, ``n`` > 1, ``stream``, ``stop`` ...) are accepted only at their greedy value.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

#: ``max_tokens`` when a request leaves it out (OpenAI's default), or the server's limit if that is lower.
DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx), the offending field ``param`` and a message naming it.

    Args:
        message: what is wrong, starting with the field's name.
        param: the request field at fault (``None`` for the body as a whole).
        status: the HTTP status to answer with.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: the adapter to use, the prompt, and how many tokens to generate.

    Args:
        model: an adapter name from ``GET /v1/models``, or ``"__base__"`` for the base model.
        prompt: text, or a list of token ids.
        max_tokens: the most tokens to generate (up to the server's ``--max-new-tokens``); absent: 16, or the
            server's limit if that is lower.
        temperature: ``0`` or absent (greedy decoding).
        top_p: ``1`` or absent.
        n: ``1`` or absent.
        best_of: ``1`` or absent.
        stream: ``false`` or absent.
        stop: absent (stop sequences are not supported).
        echo: ``false`` or absent.
        logprobs: absent.
        suffix: absent.
        presence_penalty: ``0`` or absent.
        frequency_penalty: ``0`` or absent.
        logit_bias: absent or empty.
        seed: accepted and unused (greedy decoding has no randomness).
        user: accepted and unused.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None


# field -> (is the value greedy-compatible?, why another value is refused)
_GREEDY_ONLY = {
    "temperature": (lambda v: v in (None, 0), "only greedy decoding is served; send 0 or leave it out"),
    "top_p": (lambda v: v in (None, 1), "only greedy decoding is served; send 1 or leave it out"),
    "n": (lambda v: v in (None, 1), "one completion per request; send 1 or leave it out"),
    "best_of": (lambda v: v in (None, 1), "one completion per request; send 1 or leave it out"),
    "stream": (lambda v: not v, "streaming is not supported; send false or leave it out"),
    "stop": (lambda v: v in (None, []), "stop sequences are not supported; leave it out"),
    "echo": (lambda v: not v, "echoing the prompt is not supported; send false or leave it out"),
    "logprobs": (lambda v: v is None, "log-probabilities are not returned; leave it out"),
    "suffix": (lambda v: v is None, "suffixes (insertion) are not supported; leave it out"),
    "presence_penalty": (lambda v: v in (None, 0), "penalties are not supported; send 0 or leave it out"),
    "frequency_penalty": (lambda v: v in (None, 0), "penalties are not supported; send 0 or leave it out"),
    "logit_bias": (lambda v: not v, "logit biases are not supported; leave it out"),
}

_EXPECTED = {
    "model": "a string (an adapter name, or '__base__')",
    "prompt": "a string or a list of integer token ids (one prompt per request)",
    "max_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "n": "an integer",
    "best_of": "an integer",
    "stream": "a boolean",
    "stop": "a string or a list of strings",
    "echo": "a boolean",
    "logprobs": "an integer",
    "suffix": "a string",
    "presence_penalty": "a number",
    "frequency_penalty": "a number",
    "logit_bias": "an object of numbers",
    "seed": "an integer",
    "user": "a string",
}


def _json_type(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Decode and check a request body; raise :class:`RequestError` naming the first field at fault.

    Args:
        body: the raw HTTP body.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    except RecursionError:  # arrays or objects nested thousands deep, well under the size limit
        raise RequestError("the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got {_json_type(data)}")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _first_error(error, data) from None
    for name, (allowed, why) in _GREEDY_ONLY.items():
        value = getattr(request, name)
        if not allowed(value):
            raise RequestError(f"'{name}': {why} (got {json.dumps(value)})", param=name)
    if request.max_tokens is not None and request.max_tokens < 1:
        raise RequestError(f"'max_tokens' must be at least 1, got {request.max_tokens}", param="max_tokens")
    if isinstance(request.prompt, list) and not request.prompt:
        raise RequestError("'prompt' is an empty list of token ids", param="prompt")
    return request


def _first_error(error: ValidationError, data: dict) -> RequestError:
    details = error.errors(include_url=False)
    # Missing and unknown fields first: they say most plainly what is wrong with the request.
    details.sort(key=lambda d: {"missing": 0, "extra_forbidden": 1}.get(d["type"], 2))
    first = details[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "missing":
        return RequestError(f"'{field}' is required", param=field)
    if first["type"] == "extra_forbidden":
        known = ", ".join(CompletionRequest.model_fields)
        return RequestError(f"'{field}' is not a field of a completion request (fields: {known})", param=field)
    if field == "prompt" and isinstance(data.get("prompt"), list):
        bad = next((i for i, v in enumerate(data["prompt"]) if type(v) is not int), None)
        if bad is not None:
            value = data["prompt"][bad]
            return RequestError(
                f"'prompt': token ids must be integers; item {bad} is {_json_type(value)} ({json.dumps(value)}). "
                "Send one prompt per request.",
                param="prompt",
            )
    expected = _EXPECTED.get(field or "", "another value")
    return RequestError(f"'{field}' must be {expected}, got {_json_type(data.get(field))}", param=field)


def error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
    """The OpenAI-style error object: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        message: what went wrong.
        param: the request field at fault, if one is.
        kind: ``invalid_request_error``, ``not_found_error``, ``server_error`` ...
    """
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def completion_body(request_id: str, created: int, model: str, completion: Any) -> dict[str, Any]:
    """The ``text_completion`` object for one finished request.

    Args:
        request_id: ``cmpl-...``.
        created: Unix time of the request.
        model: the adapter name the request named.
        completion: the engine's :class:`~peft_swift_ext.serve.engine.Completion`.
    """
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }
