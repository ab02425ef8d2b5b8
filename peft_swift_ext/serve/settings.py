"""The server's limits and batching window, checked before anything slow happens (no torch import here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 256
# Used when the model's config gives no context length.
FALLBACK_MAX_INPUT_TOKENS = 2048


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching window.

    Args:
        max_batch_size: the most requests in one ``generate``.
        batch_wait_ms: how long a batch stays open for more requests after its first one arrived.
        max_input_tokens: the longest prompt accepted, in tokens.
        max_new_tokens: the largest ``max_tokens`` a request may ask for.
        max_queue: the most requests waiting for a batch; more get 503.
        max_body_bytes: the largest request body accepted; larger get 413.
    """

    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_input_tokens: int = 1024
    max_new_tokens: int = 256
    max_queue: int = 1024
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_tokens", "max_new_tokens", "max_queue", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.batch_wait_ms, (int, float)) and 0 <= self.batch_wait_ms < math.inf):
            raise ValueError(f"--batch-wait-ms must be a finite number >= 0, got {self.batch_wait_ms!r}")


def resolve_token_limits(
    max_input_tokens: int | None, max_new_tokens: int, context_length: int | None
) -> tuple[int, int]:
    """The prompt and generation limits, checked against the model's context length.

    Args:
        max_input_tokens: ``--max-input-tokens`` (``None``: what the context leaves after ``max_new_tokens``).
        max_new_tokens: ``--max-new-tokens``.
        context_length: the model's ``max_position_embeddings``, if its config has one.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if max_input_tokens is None:
        max_input_tokens = FALLBACK_MAX_INPUT_TOKENS if context_length is None else context_length - max_new_tokens
    if max_input_tokens < 1:
        raise ValueError(
            f"--max-input-tokens must be >= 1, got {max_input_tokens} "
            f"(the model's context is {context_length} tokens and --max-new-tokens is {max_new_tokens})"
        )
    if context_length is not None and max_input_tokens + max_new_tokens > context_length:
        raise ValueError(
            f"--max-input-tokens ({max_input_tokens}) + --max-new-tokens ({max_new_tokens}) exceed the model's "
            f"context length ({context_length})"
        )
    return max_input_tokens, max_new_tokens
