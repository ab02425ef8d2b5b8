"""Mixed-adapter batches with prompt adapters: forward and KV-cache generation, padded rows and base rows too.

Rows of one batch share a sequence length, so rows without prompt tokens carry masked placeholders; each row still
equals that row run alone with only its adapter (or none).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_swift_ext import LoraPlusConfig, PromptConfig, Swift

from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter
from ..tiny_models import tiny_llama
from .test_mixed_batches import _alone, _build, _row, _rows_of

PROMPT_CASES = [case for case in ALL_CASES if case.id.startswith(("prompt", "vpt"))]
ROWS = ["a", "b", "a", "b"]
WITH_BASE = ["a", "__base__", "b", "__base__"]


def _prompt_llama(attn: str = "sdpa", num_layers: int = 3):
    return tiny_llama(num_layers=num_layers, attn_implementation=attn)


def _llama_prompt_config(**overrides):
    options = {
        "dim": 32,
        "target_modules": r"model\.layers\.\d+",
        "embedding_pos": 0,
        "attention_mask_pos": "attention_mask",
        "position_embeddings_pos": "position_embeddings",
        "prompt_length": 4,
        "extract_embedding": True,
    }
    return PromptConfig(**{**options, **overrides})


@pytest.mark.parametrize("entry", ["peft", "swift"])
@pytest.mark.parametrize("case", PROMPT_CASES, ids=lambda case: case.id)
def test_prompt_rows_equal_each_row_alone(case, entry):
    model = _build(case, entry)
    inputs = _rows_of(case.make_inputs(), len(ROWS))
    with torch.no_grad():
        mixed = case.output(model(**inputs, adapter_names=ROWS)).float()
    for i, name in enumerate(ROWS):
        alone = _alone(model, name, _row(inputs, i), case.output)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("entry", ["peft", "swift"])
def test_prompt_rows_next_to_base_rows_and_left_padding(attn, entry):
    base = _prompt_llama(attn)
    if entry == "peft":
        model = get_peft_model(base, _llama_prompt_config(), adapter_name="a")
        model.add_adapter("b", _llama_prompt_config())
    else:
        model = Swift.prepare_model(base, {"a": _llama_prompt_config(), "b": _llama_prompt_config()})
    randomize_adapter(model, "a", 0)
    randomize_adapter(model, "b", 1)
    model.eval()
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=WITH_BASE).logits
    for i, name in enumerate(WITH_BASE):
        # the row alone, padding included: the positions the caller passes are part of what it computes
        keep = mask[i].bool()
        alone = _alone(
            model, name, {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}, lambda o: o.logits
        )
        torch.testing.assert_close(mixed[i : i + 1, keep], alone[:, keep], atol=1e-5, rtol=0, msg=f"row {i} ({name})")


@pytest.mark.parametrize("entry", ["peft", "swift"])
def test_cached_generation_of_a_mixed_batch_equals_each_row_alone(entry):
    base = _prompt_llama()
    if entry == "peft":
        model = get_peft_model(base, _llama_prompt_config(), adapter_name="a")
        model.add_adapter("b", _llama_prompt_config())
    else:
        model = Swift.prepare_model(base, {"a": _llama_prompt_config(), "b": _llama_prompt_config()})
    randomize_adapter(model, "a", 0, scale=0.5)
    randomize_adapter(model, "b", 1, scale=0.5)
    model.eval()
    ids = torch.randint(2, 128, (4, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[3, :2] = 0
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, adapter_names=WITH_BASE, **settings)
        uncached = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=WITH_BASE, use_cache=False, **settings
        )
    assert torch.equal(batch, uncached)
    for i, name in enumerate(WITH_BASE):
        keep = mask[i].bool()
        if entry == "swift":
            model.set_active_adapters([] if name == "__base__" else [name])
            context = torch.no_grad()
        elif name == "__base__":
            context = model.disable_adapter()
        else:
            model.set_adapter(name)
            context = torch.no_grad()
        with context, torch.no_grad():
            alone = model.generate(input_ids=ids[i : i + 1, keep], attention_mask=mask[i : i + 1, keep], **settings)
        assert torch.equal(batch[i, -6:], alone[0, -6:]), f"row {i} ({name})"


def test_prompt_rows_mix_with_other_adapter_types():
    model = Swift.prepare_model(
        _prompt_llama(),
        {
            "prompt": _llama_prompt_config(),
            "lora": LoraPlusConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
        },
    )
    randomize_adapter(model, "prompt", 0)
    model.eval()
    names = ["prompt", "lora", "__base__"]
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = _alone(model, name, {"input_ids": ids[i : i + 1]}, lambda out: out.logits)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_prompt_adapters_of_different_lengths_are_refused():
    model = Swift.prepare_model(
        _prompt_llama(), {"a": _llama_prompt_config(), "b": _llama_prompt_config(prompt_length=2)}
    ).eval()
    with pytest.raises(ValueError, match="prompt_length"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), adapter_names=["a", "b"])
