"""The engine: one batched greedy ``generate`` over rows that each name their own adapter.

Any model whose ``generate`` takes ``adapter_names=[one per row]`` works: a ``PeftModel`` of LoRA-family adapters
or of one of this package's tuners, or a ``SwiftModel`` with adapters of any types. How rows are padded, decoded
and cut: docs/guides/serving.md (*How batching works*).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig, PreTrainedTokenizerBase

#: The name that selects no adapter for a row (PEFT's name for it in ``adapter_names``).
BASE_MODEL_NAME = "__base__"


@dataclass(frozen=True)
class Row:
    """One request as the engine runs it.

    Args:
        adapter: an adapter name, or ``"__base__"`` for the base model alone.
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: the most tokens to generate for this row (at least one).
    """

    adapter: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class Completion:
    """What one row produced.

    Args:
        token_ids: the generated tokens, without the end-of-sequence token that stopped them.
        text: ``token_ids`` decoded, special tokens skipped.
        finish_reason: ``"stop"`` (an end-of-sequence token came) or ``"length"`` (``max_new_tokens`` reached).
        prompt_tokens: how many tokens the prompt had.
        completion_tokens: tokens generated, counting the end-of-sequence token when there was one.
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """A model with named adapters, its tokenizer, and batched greedy generation.

    Args:
        model: a model whose ``generate`` accepts ``adapter_names`` (one name per row, ``"__base__"`` for none).
            It is put in eval mode.
        tokenizer: the base model's tokenizer.
        adapters: adapter name -> its type (shown by ``/v1/models``), in the order to list them.
        backend: how the adapters were loaded (``"peft"`` or ``"swift"``), for ``/health``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        adapters: Mapping[str, str],
        backend: str = "peft",
    ) -> None:
        if BASE_MODEL_NAME in adapters:
            raise ValueError(f"an adapter may not be named {BASE_MODEL_NAME!r}: that name selects the base model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        # The server encodes on the event loop while a batch decodes on the worker thread; a Rust-backed tokenizer
        # refuses to be borrowed mutably (its padding/truncation state) while another thread uses it.
        self._tokenizer_lock = threading.Lock()
        self.adapters = dict(adapters)
        self.backend = backend
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = _pad_token_id(tokenizer, self.eos_token_ids)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_position_embeddings: int | None = getattr(_config(model), "max_position_embeddings", None)

    @property
    def model_names(self) -> list[str]:
        """``"__base__"`` followed by every adapter name: what a request's ``model`` may be."""
        return [BASE_MODEL_NAME, *self.adapters]

    @property
    def device(self) -> torch.device:
        """Where the model's weights are, and so where the inputs go."""
        return next(self.model.parameters()).device

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids: text goes through the tokenizer (its special tokens added as it adds them).

        Args:
            prompt: text, or token ids (returned as they are; :meth:`check_token_ids` checks their range).
        """
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def check_token_ids(self, token_ids: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the first id outside ``[0, vocab_size)``.

        Args:
            token_ids: the ids to check.
        """
        for position, token in enumerate(token_ids):
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"token id {token} at position {position} is outside the vocabulary [0, {self.vocab_size})"
                )

    def generate(self, rows: Sequence[Row]) -> list[Completion]:
        """Run all rows as one left-padded greedy ``generate`` with ``adapter_names=[row.adapter, ...]``.

        Args:
            rows: the requests; every adapter name must be one of :attr:`model_names`.
        """
        if not rows:
            return []
        unknown = sorted({row.adapter for row in rows} - set(self.model_names))
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; known: {self.model_names}")
        for row in rows:
            if not row.prompt_ids or row.max_new_tokens < 1:
                raise ValueError(f"a row needs a prompt and max_new_tokens >= 1, got {row}")
        # Left padding: every row's last prompt token sits in the last column, where generation continues.
        prompts = [torch.tensor(row.prompt_ids, dtype=torch.long) for row in rows]
        input_ids = pad_sequence(prompts, batch_first=True, padding_value=self.pad_token_id, padding_side="left")
        attention_mask = pad_sequence([torch.ones_like(ids) for ids in prompts], batch_first=True, padding_side="left")
        width = input_ids.shape[1]
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(row.max_new_tokens for row in rows),
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids) or None,
        )
        device = self.device
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                adapter_names=[row.adapter for row in rows],
                generation_config=config,
            )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, width:].tolist()
        return [self._completion(row, tokens) for row, tokens in zip(rows, new_tokens)]

    def _completion(self, row: Row, tokens: list[int]) -> Completion:
        # The batch ran as long as its longest request; this row keeps only what it asked for. Greedy decoding is
        # causal, so the tokens past its own limit never changed the ones before.
        tokens = tokens[: row.max_new_tokens]
        stop = next((i for i, token in enumerate(tokens) if token in self.eos_token_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        with self._tokenizer_lock:
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(
            token_ids=tuple(kept),
            text=text,
            finish_reason="length" if stop is None else "stop",
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(tokens) if stop is None else stop + 1,
        )


def _config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    return config


def _eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The model's end-of-sequence ids (its generation config may name several) and the tokenizer's."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(token) for token in source)
    return frozenset(ids)


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int]) -> int:
    # The pad id only fills masked positions, so any id works; the tokenizer's own, else an end-of-sequence id.
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(eos_token_ids) if eos_token_ids else 0
