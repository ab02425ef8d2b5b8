"""The engine: left padding, one adapter name per row, per-row cuts; and a real PEFT model against running alone."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from peft_swift_ext.demo.models import tiny_tokenizer
from peft_swift_ext.serve.engine import BASE_MODEL_NAME, Engine, Row

from .reference import alone, reference_model

EOS = 3  # tiny_tokenizer's <|im_end|>
PAD = 1  # its <pad>


class ScriptedModel(torch.nn.Module):
    """Answers ``generate`` with a fixed continuation per adapter and records how it was called."""

    SCRIPT = {"a": [10, 11, 12, 13, 14], "b": [20, EOS, PAD, PAD, PAD], BASE_MODEL_NAME: [30, 31, 32, 33, 34]}

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)
        self.generation_config = GenerationConfig(eos_token_id=EOS)
        self.calls: list[dict] = []

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def generate(self, input_ids, attention_mask, adapter_names, generation_config):
        self.calls.append(
            {"input_ids": input_ids, "attention_mask": attention_mask, "adapter_names": adapter_names}
            | {"config": generation_config}
        )
        steps = generation_config.max_new_tokens
        new = torch.tensor([self.SCRIPT[name][:steps] for name in adapter_names])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture
def scripted():
    model = ScriptedModel()
    return model, Engine(model, tiny_tokenizer(), {"a": "LORA", "b": "ADAPTER"})


def test_rows_are_left_padded_and_name_their_adapters(scripted):
    model, engine = scripted
    engine.generate([Row("a", (40, 41, 42), 2), Row("b", (50,), 4), Row(BASE_MODEL_NAME, (60, 61), 1)])
    (call,) = model.calls
    assert call["input_ids"].tolist() == [[40, 41, 42], [PAD, PAD, 50], [PAD, 60, 61]]
    assert call["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert call["adapter_names"] == ["a", "b", BASE_MODEL_NAME]
    config = call["config"]
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, 4)


def test_each_row_keeps_its_own_length_and_stops_at_eos(scripted):
    _, engine = scripted
    tokenizer = engine.tokenizer
    a, b, base = engine.generate([Row("a", (40,), 2), Row("b", (50,), 4), Row(BASE_MODEL_NAME, (60,), 4)])
    assert (a.token_ids, a.finish_reason, a.completion_tokens) == ((10, 11), "length", 2)
    assert a.text == tokenizer.decode([10, 11])
    # b's end-of-sequence token ends it: not in its tokens or text, counted as generated
    assert (b.token_ids, b.finish_reason, b.completion_tokens, b.text) == ((20,), "stop", 2, tokenizer.decode([20]))
    assert (base.token_ids, base.finish_reason) == ((30, 31, 32, 33), "length")
    assert [c.prompt_tokens for c in (a, b, base)] == [1, 1, 1]


def test_unknown_adapter_is_refused_before_the_model_runs(scripted):
    model, engine = scripted
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zeta'\]"):
        engine.generate([Row("a", (40,), 2), Row("zeta", (40,), 2)])
    assert model.calls == []


def test_an_adapter_may_not_be_named_like_the_base():
    with pytest.raises(ValueError, match="__base__"):
        Engine(ScriptedModel(), tiny_tokenizer(), {BASE_MODEL_NAME: "LORA"})


def test_token_ids_outside_the_vocabulary_are_named(scripted):
    _, engine = scripted
    engine.check_token_ids([0, 99])
    with pytest.raises(ValueError, match=r"token id 100 at position 1 is outside the vocabulary \[0, 100\)"):
        engine.check_token_ids([5, 100])


# --- a real PEFT model: every row of one mixed batch equals that request run alone with only its adapter -----------


@pytest.mark.parametrize(("files", "backend"), [("serving_files", "swift"), ("lora_serving_files", "peft")])
def test_a_mixed_batch_equals_each_request_alone(files, backend, request):
    from peft_swift_ext.serve.loading import load_engine

    serving_files = request.getfixturevalue(files)
    engine = load_engine(*serving_files)
    assert engine.backend == backend and list(engine.adapters) == ["alpha", "beta", "gamma"]
    prompts = ["Hello there", "a", "The quick brown fox jumps", "x = 1 + 2"]
    rows = [
        Row(name, tuple(engine.encode(prompts[(i + j) % len(prompts)])), 3 + 2 * i + j)
        for i, name in enumerate(engine.model_names)
        for j in range(2)
    ]
    rows.append(Row("beta", (12, 40, 41, 77), 5))  # a prompt given as token ids
    completions = engine.generate(rows)

    model = reference_model(serving_files)
    for row, completion in zip(rows, completions):
        expected = alone(model, engine, row)
        assert list(completion.token_ids) == expected, row
        assert completion.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert completion.finish_reason == ("length" if len(expected) == row.max_new_tokens else "stop")
    # the adapters matter: one prompt, four models, not all the same completion
    same_prompt = engine.generate([Row(name, tuple(engine.encode("Hello")), 8) for name in engine.model_names])
    assert len({c.token_ids for c in same_prompt}) > 1
