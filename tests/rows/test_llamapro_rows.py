"""Mixed-adapter batches with LLaMA-PRO: each row continues through its own adapter's new blocks only.

Without a KV cache each adapter's blocks run on its own rows; with one (``generate``), every adapter's blocks run on
the whole batch. Both must give each row what it gets alone, left padding included.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_swift_ext import LlamaProConfig, Swift

from ..helpers import randomize_adapter
from ..tiny_models import tiny_llama

ROWS = ["a", "__base__", "b", "a"]


def _model(entry: str):
    base = tiny_llama(num_layers=4)
    if entry == "peft":
        model = get_peft_model(base, LlamaProConfig(num_new_blocks=2), adapter_name="a")
        model.add_adapter("b", LlamaProConfig(num_new_blocks=4))
    else:
        model = Swift.prepare_model(
            base, {"a": LlamaProConfig(num_new_blocks=2), "b": LlamaProConfig(num_new_blocks=4)}
        )
    randomize_adapter(model, "a", seed=0)
    randomize_adapter(model, "b", seed=1)
    return model.eval()


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (len(ROWS), 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _alone(model, name: str):
    if hasattr(model, "active_adapters_scope"):
        return model.active_adapters_scope(*([] if name == "__base__" else [name]))
    return model.adapters(*([] if name == "__base__" else [name]))


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("entry", ["peft", "swift"])
def test_each_row_goes_through_its_own_blocks_only(entry, use_cache):
    model = _model(entry)
    ids, mask = _left_padded()
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=ROWS, use_cache=use_cache).logits
        for i, name in enumerate(ROWS):
            keep = mask[i].bool()
            with _alone(model, name):
                alone = model(input_ids=ids[i : i + 1, keep], use_cache=use_cache).logits
            torch.testing.assert_close(mixed[i : i + 1, keep], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3, "the adapters do not differ, so this proves nothing"


@pytest.mark.parametrize("entry", ["peft", "swift"])
def test_cached_generation_of_a_mixed_batch_equals_each_row_alone(entry):
    model = _model(entry)
    ids, mask = _left_padded()
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, adapter_names=ROWS, **settings)
        for i, name in enumerate(ROWS):
            keep = mask[i].bool()
            with _alone(model, name):
                alone = model.generate(input_ids=ids[i : i + 1, keep], **settings)
            assert batch[i, ids.shape[1] :].tolist() == alone[0, int(keep.sum()) :].tolist(), f"row {i} ({name})"
