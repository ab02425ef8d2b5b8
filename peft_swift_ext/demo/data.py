"""Reading the demo dataset and turning it into padded, prompt-masked training batches."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

DATA_DIR = Path(__file__).parent / "data"
IGNORE_INDEX = -100  # label value the cross-entropy loss skips
# A short system turn replaces SmolLM2's default one (17 tokens): a third shorter sequences, a faster demo.
SYSTEM_PROMPT = "You are a concise assistant."


@dataclass
class Example:
    """One tokenised instruction/response pair.

    Args:
        input_ids: chat-formatted prompt followed by the response and the end-of-turn token.
        labels: ``input_ids`` with every prompt position set to ``IGNORE_INDEX``, so only the response is learned.
    """

    input_ids: list[int]
    labels: list[int]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; each must have non-empty ``instruction`` and ``response`` strings."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        for key in ("instruction", "response"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise ValueError(f"{path}:{number}: '{key}' must be a non-empty string")
        records.append(record)
    return records


def load_split(name: str) -> list[dict]:
    """The shipped ``train`` or ``heldout`` split."""
    return read_jsonl(DATA_DIR / f"{name}.jsonl")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """The chat-template tokens of a user turn followed by the assistant header (what generation starts from)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": instruction}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode(tokenizer: PreTrainedTokenizerBase, record: dict) -> Example:
    """Tokenise one record for training on the response only.

    The prompt and the response are tokenised separately and concatenated, so the prompt/response boundary is
    exact (a joint tokenisation could merge tokens across it). The response ends with the end-of-turn token so
    that the model learns to stop.
    """
    prompt = prompt_ids(tokenizer, record["instruction"])
    response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label ``IGNORE_INDEX``."""
    input_ids = [torch.tensor(example.input_ids, dtype=torch.long) for example in examples]
    labels = [torch.tensor(example.labels, dtype=torch.long) for example in examples]
    return {
        "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    }


def training_batches(
    examples: list[Example], batch_size: int, pad_token_id: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: each epoch visits every example once, in a new seeded order."""
    if not 0 < batch_size <= len(examples):
        raise ValueError(
            f"batch_size must be between 1 and the number of examples ({len(examples)}), got {batch_size}"
        )
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)


def eval_batches(examples: list[Example], batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The examples in order, in batches (the last one may be smaller)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_token_id)
