"""The HTTP application: ``/v1/completions``, ``/v1/models``, ``/health`` and ``/metrics`` over one engine.

Every request is checked here, before it joins a batch: a bad one gets a 4xx naming the field and never reaches
the model. Good requests go through the :class:`~peft_swift_ext.serve.batcher.DynamicBatcher`, which runs them
together as one ``generate`` on a worker thread; if that batch fails, its requests (and only they) get a 500.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .batcher import BatcherClosed, BatchFailed, DynamicBatcher, QueueFull
from .engine import Completion, Engine, Row
from .schemas import DEFAULT_MAX_TOKENS, RequestError, completion_body, error_body, parse_completion_request
from .settings import ServeSettings


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``; the batcher starts and stops with the app's lifespan.

    Args:
        engine: the loaded model and adapters (anything with ``model_names``, ``adapters``, ``backend``,
            ``encode``, ``check_token_ids`` and ``generate(rows)``, as :class:`~peft_swift_ext.serve.engine.Engine`).
        settings: limits and batching; the defaults of :class:`ServeSettings` if ``None``.
    """
    settings = settings or ServeSettings()
    # Request outcomes for /metrics (the batcher keeps the batch counters).
    counters: Counter = Counter()  # completed, failed, mixed_adapter_batches
    rejected: Counter = Counter()  # status -> count
    per_model: Counter = Counter()
    started = int(time.time())

    def run_batch(rows: list[Row]) -> list[Completion]:
        # On the batcher's worker thread, one batch at a time.
        if len({row.adapter for row in rows}) > 1:
            counters["mixed_adapter_batches"] += 1
        return engine.generate(rows)

    batcher: DynamicBatcher[Row, Completion] = DynamicBatcher(
        run_batch, settings.max_batch_size, settings.batch_wait_ms / 1000, settings.max_queue
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="peft-swift-ext multi-adapter server", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.batcher = engine, settings, batcher

    def reject(error: RequestError) -> JSONResponse:
        rejected[error.status] += 1
        kind = "not_found_error" if error.status == 404 else "invalid_request_error"
        return JSONResponse(error_body(error.message, error.param, kind), status_code=error.status)

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, settings.max_body_bytes)
            parsed = parse_completion_request(body)
            row = _to_row(engine, settings, parsed.model, parsed.prompt, parsed.max_tokens)
        except RequestError as error:
            return reject(error)
        created = int(time.time())
        try:
            completion = await batcher.submit(row)
        except (QueueFull, BatcherClosed) as error:
            rejected[503] += 1
            return JSONResponse(error_body(f"the server is busy: {error}", None, "server_error"), status_code=503)
        except BatchFailed as error:
            counters["failed"] += 1
            return JSONResponse(error_body(f"generation failed: {error}", None, "server_error"), status_code=500)
        counters["completed"] += 1
        per_model[parsed.model] += 1
        return JSONResponse(completion_body(f"cmpl-{uuid.uuid4().hex}", created, parsed.model, completion))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "peft-swift-ext",
                "adapter_type": engine.adapters.get(name),  # None for the base model
            }
            for name in engine.model_names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if batcher.running else "stopping",
            "backend": engine.backend,
            "models": engine.model_names,
            "queue_depth": batcher.queue_depth,
            "batches": batcher.stats.batches,
            "max_batch_size_seen": batcher.stats.as_dict()["max_batch_size_seen"],
        }

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {
            **batcher.stats.as_dict(),
            "mixed_adapter_batches": counters["mixed_adapter_batches"],
            "queue_depth": batcher.queue_depth,
            "completed": counters["completed"],
            "failed": counters["failed"],
            "rejected": {str(status): count for status, count in sorted(rejected.items())},
            "completed_per_model": dict(per_model),
            "settings": {name: value for name, value in asdict(settings).items() if name != "max_body_bytes"},
        }

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        # Anything not handled above: answer (rather than drop the connection) and keep serving.
        return JSONResponse(
            error_body(f"internal error: {type(error).__name__}: {error}", None, "server_error"), status_code=500
        )

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body has {declared} bytes; the limit is {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _to_row(
    engine: Engine, settings: ServeSettings, model: str, prompt: str | list[int], max_tokens: int | None
) -> Row:
    """Check the request against the engine and the limits, and tokenize it."""
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_new_tokens)
    if model not in engine.model_names:
        raise RequestError(
            f"'model': no adapter named {model!r}; available: {engine.model_names}", param="model", status=404
        )
    if max_tokens > settings.max_new_tokens:
        raise RequestError(
            f"'max_tokens' is {max_tokens}; this server generates at most {settings.max_new_tokens} tokens",
            param="max_tokens",
        )
    prompt_ids = engine.encode(prompt)
    if not prompt_ids:
        raise RequestError("'prompt' is empty: it encodes to no tokens", param="prompt")
    if len(prompt_ids) > settings.max_input_tokens:
        raise RequestError(
            f"'prompt' has {len(prompt_ids)} tokens; this server accepts at most {settings.max_input_tokens}",
            param="prompt",
        )
    try:
        engine.check_token_ids(prompt_ids)
    except ValueError as error:
        raise RequestError(f"'prompt': {error}", param="prompt") from None
    return Row(model, tuple(prompt_ids), max_tokens)
