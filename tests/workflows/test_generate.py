"""``generate()`` after adapting a causal LM, for every tuner and both entry points: greedy output with the KV cache
equals greedy output without it, and each row of a left-padded batch equals that prompt generated alone."""

from __future__ import annotations

import pytest
import torch

from ..helpers import randomize_adapter
from .cases import ids, parametrize

PAD = 0
SETTINGS = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
LM_CASES = [(pair, name) for pair, name in zip(parametrize(), ids()) if pair[0].tied is not None]


def _adapted(workflow, entry: str):
    model = workflow.build(entry)
    names = ["default"] if entry == "peft" else list(workflow.configs)
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed=seed, scale=1.0)  # zero-initialised tuners would generate as the base
    return model.eval()


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize(("workflow", "entry"), [pair for pair, _ in LM_CASES], ids=[name for _, name in LM_CASES])
def test_cached_greedy_generation_equals_uncached_and_each_row_alone(workflow, entry):
    model = _adapted(workflow, entry)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **SETTINGS)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **SETTINGS)
        assert cached.tolist() == uncached.tolist()
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            alone = model.generate(input_ids=ids[row : row + 1, keep], use_cache=True, **SETTINGS)
            assert cached[row, ids.shape[1] :].tolist() == alone[0, int(keep.sum()) :].tolist(), f"row {row}"
        # the adapters must change what the model computes (tiny tied models greedily repeat their last token
        # whatever runs, so the logits are compared, not the tokens)
        adapted = model(input_ids=ids, attention_mask=mask).logits
        plain = workflow.make_model().eval()(input_ids=ids, attention_mask=mask).logits
    assert (adapted - plain).abs().max() > 1e-3, "the adapters do not change the output, so this proves nothing"
