"""The shipped dataset and its tokenisation: files, split, prompt masking, padding."""

from __future__ import annotations

import json

import pytest

from peft_swift_ext.demo import make_dataset
from peft_swift_ext.demo.data import (
    DATA_DIR,
    IGNORE_INDEX,
    collate,
    encode,
    load_split,
    prompt_ids,
    read_jsonl,
    training_batches,
)
from peft_swift_ext.demo.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_splits_parse_and_are_large_enough():
    train, heldout = load_split("train"), load_split("heldout")
    assert len(train) >= 300
    assert len(heldout) >= 50
    tasks = set(make_dataset.TASKS)
    assert {r["task"] for r in train} == tasks
    assert {r["task"] for r in heldout} == tasks


def test_splits_are_disjoint_and_without_duplicates():
    train = [r["instruction"] for r in load_split("train")]
    heldout = [r["instruction"] for r in load_split("heldout")]
    assert len(set(train)) == len(train)
    assert len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


def test_shipped_files_are_what_the_generator_writes():
    train, heldout = make_dataset.generate()
    assert load_split("train") == train
    assert load_split("heldout") == heldout
    # byte-for-byte, so regenerating the files leaves git clean
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train)
    assert (DATA_DIR / "train.jsonl").read_text(encoding="utf-8") == expected


def test_read_jsonl_rejects_a_record_without_response(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "hi", "response": "ok"}\n{"instruction": "no answer"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'response'"):
        read_jsonl(path)


def test_prompt_tokens_are_masked_and_the_response_is_learned(tokenizer):
    record = {"instruction": "What is 2 + 3?", "response": "2 + 3 = 5"}
    example = encode(tokenizer, record)
    prompt = prompt_ids(tokenizer, record["instruction"])
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    learned = example.labels[len(prompt) :]
    assert learned == example.input_ids[len(prompt) :]
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == record["response"]
    # the prompt is the chat template's rendering, ending with the assistant header
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert "What is 2 + 3?" in tokenizer.decode(prompt)


def test_collate_pads_with_ignored_labels_and_zero_attention(tokenizer):
    short = encode(tokenizer, {"instruction": "a", "response": "b"})
    long = encode(tokenizer, {"instruction": "a longer one", "response": "b"})
    batch = collate([short, long], tokenizer.pad_token_id)
    width = len(long.input_ids)
    assert batch["input_ids"].shape == (2, width)
    pad = width - len(short.input_ids)
    assert batch["input_ids"][0, -pad:].tolist() == [tokenizer.pad_token_id] * pad
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * pad
    assert batch["labels"][1].tolist() == long.labels


def test_training_batches_cover_every_example_each_epoch(tokenizer):
    examples = [encode(tokenizer, {"instruction": str(i), "response": "x"}) for i in range(6)]
    batches = training_batches(examples, batch_size=3, pad_token_id=tokenizer.pad_token_id, seed=0)
    first_epoch = [tuple(row.tolist()) for _ in range(2) for row in next(batches)["input_ids"]]
    assert sorted(first_epoch) == sorted(
        tuple(collate([e], tokenizer.pad_token_id)["input_ids"][0].tolist()) for e in examples
    )
    with pytest.raises(ValueError, match="batch_size"):
        next(training_batches(examples, batch_size=7, pad_token_id=0))
