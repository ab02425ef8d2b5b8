"""Prompt tuning with transformers' KV cache: cached greedy generation equals uncached, token for token.

The references are the same model run without a cache (every step recomputes the whole sequence, prompts
included), so the cache path is checked against the plain forward that the rest of the Prompt tests pin down.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_swift_ext import PromptConfig, Swift

from ..helpers import base_of, randomize_adapter
from ..tiny_models import tiny_llama

LAYERS = 4
PROMPT = 4
ALL = r"model\.layers\.\d+"
# name -> (target_modules, extract_embedding): where the prompt tokens live decides how transformers sizes the
# decode mask (by the first layer's cache, which holds the prompts only when layer 0 is targeted)
PLACEMENTS = {
    "deep-all-layers": (ALL, True),
    "deep-all-layers-kept": (ALL, False),
    "deep-from-layer-1": (r"model\.layers\.[1-3]", True),
    "middle-layers-extracted": (r"model\.layers\.[12]", True),
}


def prompt_config(targets: str = ALL, extract: bool = True, prompt_length: int = PROMPT, **overrides) -> PromptConfig:
    options = {
        "dim": 32,
        "target_modules": targets,
        "embedding_pos": 0,
        "attention_mask_pos": "attention_mask",
        "position_embeddings_pos": "position_embeddings",
        "prompt_length": prompt_length,
        "extract_embedding": extract,
    }
    return PromptConfig(**{**options, **overrides})


def llama(attention: str) -> torch.nn.Module:
    model = tiny_llama(num_layers=LAYERS)
    model.set_attn_implementation(attention)
    return model


def prompted(attention: str, api: str = "peft", **config) -> torch.nn.Module:
    if api == "peft":
        model = get_peft_model(llama(attention), prompt_config(**config))
    else:
        model = Swift.prepare_model(llama(attention), {"default": prompt_config(**config)})
    # large tokens, so that the prompts decide the generated tokens
    randomize_adapter(model, "default", seed=0, scale=1.0)
    return model.eval()


def single() -> dict:
    return {"input_ids": torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(3))}


def left_padded() -> dict:
    """Three sequences of 9, 6 and 8 tokens, left-padded with token 0."""
    input_ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(input_ids)
    for row, padding in ((1, 3), (2, 1)):
        input_ids[row, :padding] = 0
        attention_mask[row, :padding] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy(model, inputs: dict, use_cache: bool, **options) -> torch.Tensor:
    return model.generate(
        **inputs, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None, **options
    )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate()`` gives a left-padded batch."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("api", ["peft", "swift"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_greedy_generation_equals_uncached(attention, api, placement):
    targets, extract = PLACEMENTS[placement]
    model = prompted(attention, api, targets=targets, extract=extract)
    plain = llama(attention)
    for inputs in (single(), left_padded()):
        uncached = greedy(model, inputs, use_cache=False)
        assert torch.equal(greedy(model, inputs, use_cache=True), uncached)
        # not trivially equal: the prompts change what is generated
        assert not torch.equal(greedy(plain, inputs, use_cache=True), uncached)


@pytest.mark.parametrize("options", [{"num_beams": 2}, {"prefill_chunk_size": 4}], ids=["beams", "chunked-prefill"])
def test_beam_search_and_chunked_prefill_with_the_cache_equal_uncached(options):
    model = prompted("sdpa")
    inputs = left_padded()
    uncached = {key: value for key, value in options.items() if key != "prefill_chunk_size"}  # needs a cache
    assert torch.equal(greedy(model, inputs, True, **options), greedy(model, inputs, False, **uncached))


@pytest.mark.parametrize("new_tokens", [1, 5], ids=["one-token-step", "five-token-step"])
@pytest.mark.parametrize("targets", [ALL, r"model\.layers\.[1-3]"], ids=["from-layer-0", "from-layer-1"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_of_a_cached_step_equal_the_uncached_forward(attention, targets, new_tokens):
    model = prompted(attention, targets=targets)
    batch = left_padded()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids, cut = positions(mask), ids.shape[1] - new_tokens
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        prefill = model(
            input_ids=ids[:, :cut], attention_mask=mask[:, :cut], position_ids=position_ids[:, :cut], use_cache=True
        )
        step = model(
            input_ids=ids[:, cut:], attention_mask=mask, position_ids=position_ids[:, cut:], cache=prefill.cache
        ).logits
    # padding positions are left out: a padding query attends to nothing real, so its output is arbitrary
    real = mask.bool()
    torch.testing.assert_close(prefill.logits[real[:, :cut]], full[:, :cut][real[:, :cut]], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, cut:], atol=1e-5, rtol=0)
    plain = llama(attention)(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    assert (full - plain).abs().max() > 1e-2  # the prompts act


def test_prompt_tokens_enter_each_targeted_layers_cache_once_at_prefill():
    model = prompted("sdpa")
    ids = single()["input_ids"]
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=True)
        cache = prefill.cache
        assert [cache.get_seq_length(i) for i in range(LAYERS)] == [PROMPT + ids.shape[1]] * LAYERS
        before = [cache.layers[i].keys[:, :, :PROMPT].clone() for i in range(LAYERS)]
        next_id = prefill.logits[:, -1:].argmax(-1)
        model(input_ids=next_id, position_ids=torch.tensor([[ids.shape[1]]]), cache=cache)
    assert [cache.get_seq_length(i) for i in range(LAYERS)] == [PROMPT + ids.shape[1] + 1] * LAYERS
    for i in range(LAYERS):  # the prompt positions were not written again
        assert torch.equal(cache.layers[i].keys[:, :, :PROMPT], before[i])


def test_two_active_prompt_adapters_generate_the_same_with_and_without_the_cache():
    model = Swift.prepare_model(llama("eager"), {"a": prompt_config(), "b": prompt_config(prompt_length=3)})
    for name in ("a", "b"):
        randomize_adapter(model, name, seed=len(name), scale=1.0)
    assert model.active_adapters == ["a", "b"]
    inputs = left_padded()
    assert torch.equal(greedy(model, inputs, True), greedy(model, inputs, False))


# --- refusals: what a cache cannot give is refused with a clear error, never a silent difference ---------------


def test_prompts_extracted_before_the_last_layer_while_layer_0_holds_them_are_refused_at_the_first_decode_step():
    model = prompted("eager", targets=r"model\.layers\.[01]")
    with pytest.raises(ValueError, match=r"must reach the last one: the layers after model\.layers\.1"):
        greedy(model, left_padded(), use_cache=True)
    greedy(model, left_padded(), use_cache=False)  # fine without a cache


def test_prompts_after_the_sequence_are_refused_on_a_causal_decoder():
    # no token of a causal decoder could see them, with a cache or without: refused when the adapter is built
    with pytest.raises(ValueError, match=r"attach_front=False does not fit model\.layers\.0: its attention is causal"):
        prompted("sdpa", attach_front=False, extract=True)


def test_a_static_cache_is_refused():
    with pytest.raises(ValueError, match=r"cannot use a static \(compile-able\) KV cache"):
        greedy(prompted("sdpa"), single(), use_cache=True, cache_implementation="static")


def test_a_cache_filled_with_other_prompts_than_the_active_ones_is_refused():
    model = prompted("sdpa")
    ids = single()["input_ids"]
    step = {"input_ids": ids[:, -1:], "position_ids": torch.tensor([[ids.shape[1]]])}
    with torch.no_grad():
        with model.disable_adapter():
            cache = model(input_ids=ids, use_cache=True).cache
            model(**step, cache=cache)  # no prompts in the cache, none active: a plain decode step
        with pytest.raises(ValueError, match=r"filled with the prompt tokens of \[\], but \['default'\] are active"):
            model(**step, cache=cache)
        cache = model(input_ids=ids, use_cache=True).cache
        with model.disable_adapter(), pytest.raises(ValueError, match=r"tokens of \['default'\], but \[\] are active"):
            model(**step, cache=cache)


def test_prompt_layers_know_their_cache_layer():
    model = prompted("sdpa")
    layers = base_of(model).model.layers
    assert [layer.cache_layer_index for layer in layers] == list(range(LAYERS))
