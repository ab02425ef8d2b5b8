"""Prompt tokens in transformers' KV cache: added once, at prefill, and attended to by every later step (see
docs/tuners/prompt.md, "Generation with the KV cache").

transformers builds one mask per step from the 2-D attention mask (real tokens only) and the length of the first
decoder layer's cache (``Cache.get_mask_sizes``). Two layouts reach a prompt layer at a decode step:

- the first decoder layer's cache holds the prompt tokens (it is targeted): the mask has a column per cached key,
  but transformers pads the 2-D mask on the right to that length, so the real tokens' columns come first and
  the last ``prompt`` columns are masked. :func:`decode_mask` moves the real columns behind ``prompt`` attended
  columns and keeps them causal with respect to the real positions;
- the first decoder layer holds no prompt tokens: the mask covers the real tokens only, and the prompt columns are
  added in front.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

# Attribute of a transformers cache recording, per cache layer index, which prompt adapters' tokens it holds
# (written at prefill, checked at every decode step so that a cache filled otherwise is refused, not misread).
_RECORD = "peft_swift_ext_prompt_adapters"


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The transformers ``Cache`` among a layer call's arguments (``cache=`` / ``past_key_values=``), or None."""
    return next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)


def cache_layer_index(module: nn.Module) -> int | None:
    """The index under which ``module`` (a decoder layer) stores keys and values in a cache, or None.

    transformers' attention modules keep it as ``layer_idx``; the first one found in ``module`` counts.
    """
    indices = (getattr(child, "layer_idx", None) for child in module.modules())
    return next((index for index in indices if isinstance(index, int) and not isinstance(index, bool)), None)


def record_prompts(cache: Cache, layer_index: int, adapters: tuple[str, ...]) -> None:
    """Note that the cache layer ``layer_index`` now holds the tokens of ``adapters`` (in that order)."""
    vars(cache).setdefault(_RECORD, {})[layer_index] = adapters


def recorded_prompts(cache: Cache, layer_index: int) -> tuple[str, ...] | None:
    """The prompt adapters whose tokens the cache layer ``layer_index`` holds, or None if none were recorded."""
    return getattr(cache, _RECORD, {}).get(layer_index)


def decode_mask(mask: torch.Tensor, past: int, queries: int, prompt: int, value) -> torch.Tensor:
    """The attention mask of a decode step over ``prompt`` cached prompt keys in front of the real keys.

    Args:
        mask: the mask transformers passes to the layer, ``(..., queries, keys)`` or a 2-D ``(batch, keys)``.
        past: positions the layer's cache held before this step, prompt tokens included.
        queries: new positions in this step.
        prompt: prompt tokens in the cache (in front of the sequence).
        value: the mask value of prompt positions in numeric masks (boolean masks get True unless it is a bool).

    Raises:
        ValueError: when the mask covers neither all cached keys nor the real ones only.
    """
    keys, width = past + queries, mask.shape[-1]
    if width == keys:  # transformers counted the prompt keys: its real columns come first, then padding
        real = mask[..., : keys - prompt]
        if queries > 1 and mask.dim() >= 3:
            real = _causal(real, queries)
    elif width == keys - prompt:
        real = mask
    else:
        raise ValueError(
            f"the attention mask covers {width} key positions, but the KV cache holds {keys} ({prompt} of them "
            "prompt tokens); pass the 2-D attention mask of the real tokens only"
        )
    fill = value if mask.dtype != torch.bool or isinstance(value, bool) else True
    columns = real.new_full((*real.shape[:-1], prompt), fill)
    return torch.cat((columns, real), dim=-1)


def _causal(mask: torch.Tensor, queries: int) -> torch.Tensor:
    """Mask real key ``j`` for query ``i`` when ``j`` is later than the query (keys and queries end together)."""
    keys = mask.shape[-1]
    key_positions = torch.arange(keys, device=mask.device)
    query_positions = torch.arange(keys - queries, keys, device=mask.device)
    future = key_positions[None, :] > query_positions[:, None]
    if mask.dtype == torch.bool:
        return mask & ~future
    return mask.masked_fill(future, torch.finfo(mask.dtype).min)
