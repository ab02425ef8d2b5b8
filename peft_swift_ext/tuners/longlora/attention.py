"""Shifted sparse attention (S²-Attn) as attention functions of transformers' ``AttentionInterface``.

LongLoRA switches a model's ``config._attn_implementation`` to ``longlora_sdpa`` or ``longlora_eager``. Those
functions ask the model's registered switch (found through the attention module's config) whether an adapter is
active and the module is training; if not they call plain sdpa / eager attention unchanged. Groups, padding and
the causal mask by original position (unlike ms-swift's) are described in docs/tuners/longlora.md.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

#: original attention implementation -> the S² one registered for it
S2_IMPLEMENTATIONS = {"sdpa": "longlora_sdpa", "eager": "longlora_eager"}

# id(model config) -> (weak reference to an object, its function returning the active adapter's group rule or None).
# A plain weakref.ref and a function, not a WeakMethod: torch.compile traces calls of the former, not the latter.
_SWITCHES: dict[int, tuple[weakref.ref, Callable]] = {}


def register_switch(config, rule: Callable[[], tuple[float, int | None] | None]) -> None:
    """Let attention modules whose ``config`` is ``config`` ask the bound method ``rule`` whether S² applies.

    Both are held weakly, so a discarded model takes its entry with it.
    """
    key = id(config)
    _SWITCHES[key] = (weakref.ref(rule.__self__), rule.__func__)
    weakref.finalize(config, _SWITCHES.pop, key, None)


def active_rule(module) -> tuple[float, int | None] | None:
    """The group rule for this attention module's model, or None when S² does not apply."""
    entry = _SWITCHES.get(id(getattr(module, "config", None)))
    owner = entry[0]() if entry is not None else None
    return entry[1](owner) if owner is not None else None


def unregister_switch(config) -> None:
    """Forget the S²-attention switch registered for a model config (when its LongLoRA adapters are gone).

    Args:
        config: the model config the switch was registered for.
    """
    _SWITCHES.pop(id(config), None)


def group_size_for(length: int, ratio: float, fixed: int | None) -> int:
    """Tokens per group for a sequence of ``length``: ``fixed`` (capped at the length) or ``int(length * ratio)``."""
    size = min(fixed, length) if fixed is not None else int(length * ratio)
    if size < 2:
        raise ValueError(
            f"LongLoRA: sequence length {length} with group_size_ratio={ratio} gives groups of {size} token(s); "
            "use a longer sequence, a larger LongLoraConfig.group_size_ratio or a fixed group_size"
        )
    return size


def shifted_sparse_attention(
    inner: Callable, module, query, key, value, attention_mask, group: int, **kwargs
) -> tuple[torch.Tensor, None]:
    """S²-Attn of ``query`` (B, H, L, D) against ``key`` / ``value`` (B, KVH, L, D), computed by ``inner``.

    Args:
        inner: sdpa or eager attention of transformers (``(module, q, k, v, mask, **kwargs)``).
        module: the attention module (its ``num_key_value_groups`` drives GQA in ``inner``).
        attention_mask: None (causal, no padding), a boolean (B, 1, L, L) mask, or an additive float one.
        group: tokens per group.
    Returns ``(output (B, L, H, D), None)``.
    """
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    if kv_heads % 2:
        # Halving the heads must keep each query head with its key/value head: expand odd key/value heads first.
        key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
        module, kv_heads = _WithoutGQA(module), heads
    allowed = _as_allowed(attention_mask)
    padded = math.ceil(length / group) * group
    plain = torch.arange(padded, device=query.device)
    # Without padding, sdpa can use its causal (flash) kernel for every group except the wrapping one.
    causal_kernel = inner is sdpa_attention_forward and allowed is None and padded == length
    outputs = []
    for shift, q_heads, kv in (
        (0, slice(0, heads // 2), slice(0, kv_heads // 2)),
        (group // 2, slice(heads // 2, heads), slice(kv_heads // 2, kv_heads)),
    ):
        order = (plain + shift) % padded
        grouped = [_to_groups(t, order, length, group) for t in (query[:, q_heads], key[:, kv], value[:, kv])]
        if causal_kernel:
            # shifted by 0 < g / 2 < g, the last group wraps round the sequence's end; unshifted, none does
            out = _causal_groups(inner, module, grouped, order, batch, group, kwargs, wraps=shift > 0)
        else:
            mask = _group_mask(order, length, group, allowed, batch)
            if inner is eager_attention_forward:
                mask = _additive(mask, query.dtype)
            out, _ = inner(module, *grouped, mask, **kwargs)  # (B*G, g, h, D)
        out = out.reshape(batch, padded, out.shape[-2], out.shape[-1])
        outputs.append(out.index_select(1, torch.argsort(order))[:, :length])
    return torch.cat(outputs, dim=2), None


def _causal_groups(
    inner, module, grouped: list, order: torch.Tensor, batch: int, group: int, kwargs: dict, wraps: bool
):
    """Attention of unpadded groups: causal by position, except a group wrapping round the sequence's end.

    In the wrapping group (``wraps``: the order's last group holds tokens from the end and from the start) the
    tokens from the start come last but are the earliest, so it gets an explicit mask. ``wraps`` is known from
    the shift, so no tensor is read back (which would split a compiled graph).
    """
    if not wraps:
        return inner(module, *grouped, None, is_causal=True, **kwargs)[0]
    per_group = [t.view(batch, -1, *t.shape[1:]) for t in grouped]  # (B, G, h, g, D)
    position = order[-group:]
    last_mask = (position[None, :] <= position[:, None])[None, None]
    last = inner(module, *(t[:, -1] for t in per_group), last_mask, **kwargs)[0]  # (B, g, h, D)
    parts = [last.unsqueeze(1)]
    if per_group[0].shape[1] > 1:
        rest = [t[:, :-1].reshape(-1, *t.shape[2:]) for t in per_group]
        head = inner(module, *rest, None, is_causal=True, **kwargs)[0]
        parts.insert(0, head.view(batch, -1, *head.shape[1:]))
    return torch.cat(parts, dim=1).reshape(-1, *last.shape[1:])


def _to_groups(tensor: torch.Tensor, order: torch.Tensor, length: int, group: int) -> torch.Tensor:
    """(B, h, L, D) -> (B * G, h, g, D) with tokens taken in ``order`` (padding past ``length`` with zeros)."""
    batch, heads, _, dim = tensor.shape
    padded = order.numel()
    if padded > length:
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, padded - length))
    tensor = tensor.index_select(2, order).view(batch, heads, padded // group, group, dim)
    return tensor.transpose(1, 2).reshape(-1, heads, group, dim)


def _group_mask(order: torch.Tensor, length: int, group: int, allowed: torch.Tensor | None, batch: int):
    """Boolean (B * G, 1, g, g) mask: key visible iff it is not later than the query and not padding."""
    position = order.view(-1, group)  # (G, g) original positions
    mask = (position[:, None, :] <= position[:, :, None]) & (position < length)[:, None, :]
    mask = mask.unsqueeze(0)  # (1, G, g, g)
    if allowed is not None:
        clamped = position.clamp(max=length - 1)
        mask = mask & allowed[:, 0][:, clamped[:, :, None], clamped[:, None, :]]
    # A padding query may see nothing; let it see itself so softmax stays finite (its output is discarded).
    mask = mask | (~mask.any(-1, keepdim=True) & torch.eye(group, dtype=torch.bool, device=order.device))
    return mask.expand(batch, -1, -1, -1).reshape(-1, 1, group, group)


def _as_allowed(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # exactly what transformers' eager_mask makes of a boolean mask
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


class _WithoutGQA:
    """The attention module as seen by ``inner`` once key/value heads were already expanded to all heads."""

    num_key_value_groups = 1

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _eager_mask_from_sdpa(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor):
    """The additive mask eager attention gets from transformers, rebuilt from the sdpa (boolean or skipped) one.

    Both S² implementations use sdpa's mask so that, without padding, no (L, L) mask is ever built.
    """
    q_length, kv_length = query.shape[2], key.shape[2]
    if mask is None:
        if q_length == 1:
            return None
        position = torch.arange(kv_length, device=query.device)
        mask = (position[None, :] <= position[kv_length - q_length :, None])[None, None]
    return _additive(mask, query.dtype)


def _make_attention(implementation: str) -> Callable:
    inner = sdpa_attention_forward if implementation == "sdpa" else eager_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        settings = active_rule(module) if module.training else None
        length = query.shape[2]
        group = group_size_for(length, *settings) if settings is not None and 1 < length == key.shape[2] else None
        # One group holding every token is full causal attention (the shift only reorders it), so skip the work.
        if group is None or group >= length:
            if inner is eager_attention_forward:
                attention_mask = _eager_mask_from_sdpa(attention_mask, query, key)
            return inner(module, query, key, value, attention_mask, **kwargs)
        kwargs.pop("is_causal", None)
        return shifted_sparse_attention(inner, module, query, key, value, attention_mask, group, **kwargs)

    attention.__name__ = f"{S2_IMPLEMENTATIONS[implementation]}_attention"
    return attention


for _implementation, _name in S2_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _make_attention(_implementation))
    AttentionMaskInterface.register(_name, sdpa_mask)
