"""The Prompt tuner layer: learnable tokens added to (first layer) or written into (deeper layers) a sequence."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer
from ...core.rows import current_rows, plan_rows, rows_state
from ...core.slots import ArgumentSlot, Position, first_tensor, replace_first_tensor
from .cache import cache_layer_index, decode_mask, find_cache, record_prompts, recorded_prompts


@dataclass(frozen=True)
class PromptSettings:
    """How one adapter's tokens enter one layer.

    Args:
        concatenates: this is the adapter's first layer, so its tokens are added to the sequence; otherwise
            they replace the positions the first layer added (deep prompt tuning).
        extracts: remove the adapter's tokens from this layer's output (its last layer, with
            ``extract_embedding``).
        attach_front: tokens before (True) or after the sequence.
        embedding_pos / attention_mask_pos / position_embeddings_pos: the layer's arguments (SWIFT positions).
        mask_value: the value of the prompt positions in numeric attention masks.
    """

    concatenates: bool
    extracts: bool
    attach_front: bool
    embedding_pos: Position
    attention_mask_pos: Position | None
    position_embeddings_pos: Position | None
    mask_value: float | int | bool


class PromptLayer(SwiftTunerLayer):
    """Wraps a transformer layer; active adapters put their prompt tokens into its hidden states.

    Several adapters may be active in one layer when they play the same part there (all first layers or
    all deeper layers) and attach on the same side; the first adapter's tokens sit nearest the sequence.

    With a transformers KV cache the tokens enter at prefill only (see :mod:`.cache`): a call whose cache layer
    already holds this layer's past adds no tokens and gets a mask over the cached prompt keys.

    Args:
        base_layer: the wrapped layer.
        module_name: its name in the model, for error messages.
    """

    adapter_layer_names = ("prompt_token",)
    other_param_names = ("prompt_settings",)
    tuner_name = "Prompt"

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(base_layer)
        self.module_name = module_name
        self.prompt_token = nn.ParameterDict()
        self.prompt_settings: dict[str, PromptSettings] = {}
        self.cache_layer_index = cache_layer_index(base_layer)

    def update_layer(self, adapter_name: str, dim: int, prompt_length: int, settings: PromptSettings) -> None:
        """Create the ``(1, prompt_length, dim)`` tokens of ``adapter_name`` (SWIFT's Xavier-uniform init)."""
        token = nn.Parameter(torch.zeros(1, prompt_length, dim))
        if token.device.type != "meta":
            nn.init.xavier_uniform_(token)
        self.prompt_token[adapter_name] = token
        self.prompt_settings[adapter_name] = settings
        move_adapter_to_base_device(self, adapter_name)

    def adapters_passing_tokens_on(self) -> list[str]:
        """The adapters whose tokens stay in this layer's output (every layer but an extracting last one)."""
        return [name for name, setting in self.prompt_settings.items() if not setting.extracts]

    def forward(self, *args, **kwargs):
        rows = current_rows()
        if rows is not None:
            return self._forward_rows(rows, args, kwargs)
        names = list(self.adapters_to_apply())
        cache = find_cache(args, kwargs)
        past = self._cached_positions(cache, names)
        if not names:
            return self.base_layer(*args, **kwargs)
        settings = [self.prompt_settings[name] for name in names]
        if len({replace(s, extracts=False) for s in settings}) > 1:
            raise ValueError(
                f"prompt adapters {names} are active together in {self.module_name} but differ in whether this is "
                "their first layer, in attach_front or in argument positions / mask value; activate them one at a time"
            )
        first = settings[0]
        embedding = ArgumentSlot(self.base_layer, first.embedding_pos)
        hidden = embedding.get(args, kwargs)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(
                f"PromptConfig.embedding_pos={first.embedding_pos!r} does not select a (batch, sequence, hidden) "
                f"tensor in the call of {self.module_name}; got {type(hidden).__name__}"
            )
        if past:
            return self._decode_step(args, kwargs, names, settings, cache, past, hidden.shape[1])
        hidden = self._insert_tokens(names, hidden, first)
        args, kwargs = embedding.replace(args, kwargs, hidden)
        length, front = hidden.shape[1], first.attach_front
        args, kwargs = self._replace_argument(
            args, kwargs, first.attention_mask_pos, lambda m: extend_attention_mask(m, length, front, first.mask_value)
        )
        args, kwargs = self._replace_argument(
            args, kwargs, first.position_embeddings_pos, lambda t: tuple(extend_positions(x, length, front) for x in t)
        )
        output = self.base_layer(*args, **kwargs)
        extracted = [name for name, setting in zip(names, settings) if setting.extracts]
        return self._remove_tokens(output, names, extracted, first.attach_front) if extracted else output

    def _forward_rows(self, rows: tuple[str, ...], args: tuple, kwargs: dict):
        """A mixed batch: each row gets its own adapter's tokens; rows without one get masked placeholders.

        Every row of a batch has one sequence length, so the first targeted layer adds ``prompt_length`` positions
        to every row: the row's adapter's tokens, or zeros that no real token attends to (the row then computes
        what it computes without prompts). The adapters of one batch must agree on their settings and length.
        """
        plan = plan_rows(rows, self.prompt_token, len(rows), self.module_name)
        if not plan:
            return self.base_layer(*args, **kwargs)
        settings = [self.prompt_settings[name] for name in plan.adapters]
        lengths = {self.prompt_token[name].shape[1] for name in plan.adapters}
        if len({replace(s, extracts=False) for s in settings}) > 1 or len(lengths) > 1:
            raise ValueError(
                f"prompt adapters {list(plan.adapters)} differ in {self.module_name} (settings or prompt_length); "
                "rows of one batch can only mix prompt adapters made with the same PromptConfig layout"
            )
        first, length = settings[0], lengths.pop()
        state = rows_state()
        embedding = ArgumentSlot(self.base_layer, first.embedding_pos)
        hidden = embedding.get(args, kwargs)
        cache = find_cache(args, kwargs)
        past = self._rows_cached(cache, rows)
        if past:
            return self._decode_rows(args, kwargs, first, length, state, past, hidden.shape[1])
        tokens = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
        for k, name in enumerate(plan.adapters):
            tokens[plan.rows[plan.index == k]] = self._tokens(name, hidden[:1])[0]
        front = first.attach_front
        if first.concatenates:
            state["prompt_rows"] = set(plan.rows.tolist())
            hidden = torch.cat((tokens, hidden) if front else (hidden, tokens), dim=1)
        else:
            carrying = state.get("prompt_rows")
            if carrying is None or not set(plan.rows.tolist()) <= carrying:
                raise ValueError(
                    f"{self.module_name} is a deeper prompt layer for rows whose prompt tokens no earlier layer added"
                )
            span = slice(0, length) if front else slice(hidden.shape[1] - length, hidden.shape[1])
            hidden = hidden.clone()
            hidden[plan.rows, span] = tokens[plan.rows]
        args, kwargs = embedding.replace(args, kwargs, hidden)
        placeholders = [row for row in range(len(rows)) if row not in state["prompt_rows"]]
        args, kwargs = self._mask_rows(args, kwargs, first, hidden.shape[1], length, placeholders, len(rows))
        args, kwargs = self._replace_argument(
            args,
            kwargs,
            first.position_embeddings_pos,
            lambda t: tuple(extend_positions(x, hidden.shape[1], front) for x in t),
        )
        output = self.base_layer(*args, **kwargs)
        if not any(setting.extracts for setting in settings):
            return output
        # every row's prompt positions are where the first adapter's tokens sit (all adapters have one length)
        return self._remove_tokens(output, plan.adapters[:1], plan.adapters[:1], front)

    def _rows_cached(self, cache, rows: tuple[str, ...]) -> int:
        """Positions this layer's cache holds from earlier steps of the same mixed batch (0 at prefill)."""
        if cache is None:
            return 0
        index = self.cache_layer_index
        if index is None or cache.is_compileable:
            raise ValueError(
                f"a mixed batch with prompt adapters needs a dynamic KV cache with a layer index in {self.module_name}"
            )
        past = cache.get_seq_length(index)
        key = ("rows", *rows)
        if not past:
            record_prompts(cache, index, key)
        elif recorded_prompts(cache, index) != key:
            raise ValueError(f"the KV cache of {self.module_name} was filled for another batch; generate again")
        return past

    def _mask_rows(
        self, args: tuple, kwargs: dict, first: PromptSettings, total: int, length: int, placeholders, batch: int
    ):
        """The attention mask over ``total`` positions: the prompt keys attended, except the placeholders' rows'.

        Without a mask (transformers passes none to a causal SDPA layer without padding), one is built when
        placeholders need masking.
        """
        position = first.attention_mask_pos
        if position is None:
            if placeholders:
                raise ValueError(
                    f"rows without prompt tokens next to rows with them need an attention mask in {self.module_name} "
                    "(PromptConfig.attention_mask_pos); its layers take none"
                )
            return args, kwargs
        slot = ArgumentSlot(self.base_layer, position)
        mask = slot.get(args, kwargs)
        if mask is None and not placeholders:
            return args, kwargs
        if mask is None:
            mask = _plain_mask(batch, total - length, _is_causal(self.base_layer), _device(args, kwargs))
        mask = extend_attention_mask(mask, total, first.attach_front, first.mask_value)
        if placeholders:
            mask = _mask_prompt_keys(mask, batch, placeholders, length, first.attach_front)
        return slot.replace(args, kwargs, mask)

    def _decode_rows(self, args, kwargs, first: PromptSettings, length: int, state: dict, past: int, queries: int):
        if not first.attach_front:
            raise ValueError("prompt tokens after the sequence (attach_front=False) cannot be cached; use_cache=False")
        placeholders = [row for row in range(len(current_rows())) if row not in state.get("prompt_rows", ())]
        position = first.attention_mask_pos
        slot = None if position is None else ArgumentSlot(self.base_layer, position)
        mask = None if slot is None else slot.get(args, kwargs)
        if isinstance(mask, torch.Tensor):
            mask = decode_mask(mask, past, queries, length, first.mask_value)
        elif placeholders and slot is not None:
            mask = _plain_mask(len(current_rows()), queries, True, _device(args, kwargs))
            mask = torch.cat((mask.new_ones(*mask.shape[:-1], past), mask), dim=-1)
        if placeholders and isinstance(mask, torch.Tensor):
            mask = _mask_prompt_keys(mask, len(current_rows()), placeholders, length, True)
        if slot is not None and isinstance(mask, torch.Tensor):
            args, kwargs = slot.replace(args, kwargs, mask)
        return self.base_layer(*args, **kwargs)

    def _cached_positions(self, cache, names: list[str]) -> int:
        """Positions this layer's KV cache holds from earlier calls: 0 without a cache and at prefill.

        A prefill records which adapters' tokens the cache layer receives; a later call must have the same
        adapters active, since the cached positions are read as ``[their tokens ; the sequence]``.
        """
        if cache is None:
            return 0
        if names and cache.is_compileable:
            raise ValueError(
                f"prompt adapters {names} cannot use a static (compile-able) KV cache, whose masks span its "
                "preallocated length: generate with the default dynamic cache, or with use_cache=False"
            )
        index = self.cache_layer_index
        if index is None:
            if not names or cache.get_seq_length() == 0:
                return 0  # nothing of ours to find, or nothing cached anywhere yet (a prefill)
            raise ValueError(
                f"{self.module_name} got a KV cache holding earlier positions, but no `layer_idx` was found in it to "
                "tell which cache layer is its own; generate with use_cache=False"
            )
        past = cache.get_seq_length(index)
        if not past:
            record_prompts(cache, index, tuple(names))
            return 0
        held = recorded_prompts(cache, index)
        if held != tuple(names) and (held or names):
            raise ValueError(
                f"the KV cache of {self.module_name} was filled with the prompt tokens of {list(held or [])}, but "
                f"{names} are active now; generate again from the start (or with use_cache=False)"
            )
        return past

    def _decode_step(self, args, kwargs, names: list[str], settings: list[PromptSettings], cache, past, queries):
        """A call with a cache that already holds the prompt tokens: run the new positions over them."""
        first = settings[0]
        if not first.attach_front:
            raise ValueError(
                f"prompt adapters {names} attach their tokens after the sequence (PromptConfig.attach_front=False), "
                "where every new token would have to go before them; generate with use_cache=False"
            )
        prompt = self._total_length(names)
        position = first.attention_mask_pos
        mask_slot = None if position is None else ArgumentSlot(self.base_layer, position)
        mask = None if mask_slot is None else mask_slot.get(args, kwargs)
        if isinstance(mask, torch.Tensor):
            counted = mask.shape[-1] == past + queries
            if counted and any(s.extracts for s in settings):
                self._check_later_layers_hold_prompts(cache, past)
            args, kwargs = mask_slot.replace(args, kwargs, decode_mask(mask, past, queries, prompt, first.mask_value))
        return self.base_layer(*args, **kwargs)

    def _check_later_layers_hold_prompts(self, cache, past: int) -> None:
        # transformers sizes every layer's mask by the first layer's cache; here that includes the prompt keys,
        # so a later layer whose cache lacks them (the prompts were extracted before it) would get a wrong mask.
        later = cache.get_seq_length(self.cache_layer_index + 1)
        if later and later != past:
            raise ValueError(
                f"with a KV cache, the prompt tokens that start in the first decoder layer must reach the last one: "
                f"the layers after {self.module_name} (where extract_embedding removes them) would get masks sized "
                "for the prompt keys they do not hold; target every later layer too, or generate with use_cache=False"
            )

    def _total_length(self, names: list[str]) -> int:
        return sum(self.prompt_token[name].shape[1] for name in names)

    def _tokens(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        token = self.prompt_token[name]
        if token.shape[-1] != hidden.shape[-1]:
            raise ValueError(
                f"PromptConfig.dim={token.shape[-1]} does not fit {self.module_name}: its hidden states have size "
                f"{hidden.shape[-1]}"
            )
        return token.to(hidden.dtype).expand(hidden.shape[0], -1, -1)

    def _insert_tokens(self, names: list[str], hidden: torch.Tensor, first: PromptSettings) -> torch.Tensor:
        front = first.attach_front
        if not first.concatenates:  # a deeper layer: its tokens replace the block the first layer added
            prompt = self._total_length(names)
            if hidden.shape[1] < prompt:
                raise ValueError(
                    f"{self.module_name} is a deeper prompt layer but its input has only {hidden.shape[1]} positions; "
                    "the first targeted layer must run before it"
                )
            hidden = hidden[:, prompt:] if front else hidden[:, : hidden.shape[1] - prompt]
        for name in names:
            tokens = self._tokens(name, hidden)
            hidden = torch.cat((tokens, hidden) if front else (hidden, tokens), dim=1)
        return hidden

    def _replace_argument(self, args: tuple, kwargs: dict, position, extend) -> tuple[tuple, dict]:
        """Pass ``extend(value)`` instead of the argument at ``position`` (mask / rotary table), if it was given."""
        if position is None:
            return args, kwargs
        slot = ArgumentSlot(self.base_layer, position)
        value = slot.get(args, kwargs)
        return (args, kwargs) if value is None else slot.replace(args, kwargs, extend(value))

    def _remove_tokens(self, output, names: list[str], extracted: list[str], front: bool):
        hidden = first_tensor(output)
        # the tokens sit as _insert_tokens put them, the first adapter's nearest the sequence; keep the slices
        # between the removed spans (plain ints, so torch.compile keeps one graph; a boolean index would not)
        start = 0 if front else hidden.shape[1] - self._total_length(names)
        kept, cursor = [], 0
        for name in reversed(names) if front else names:
            length = self.prompt_token[name].shape[1]
            if name in extracted:
                kept.append(hidden[:, cursor:start])
                cursor = start + length
            start += length
        kept.append(hidden[:, cursor:])
        return replace_first_tensor(output, torch.cat(kept, dim=1))


def extend_attention_mask(mask: torch.Tensor, length: int, front: bool, value) -> torch.Tensor:
    """Extend an attention mask to ``length`` key positions (and query positions for square masks).

    New key columns hold ``value`` (boolean masks: True, i.e. attend, unless ``value`` is a bool). For a
    per-query mask (``..., queries, keys``) the new query rows copy the row of the neighbouring token.
    """
    extra = length - mask.shape[-1]
    if extra <= 0:
        return mask
    fill = value if mask.dtype != torch.bool or isinstance(value, bool) else True
    columns = mask.new_full((*mask.shape[:-1], extra), fill)
    square = mask.dim() >= 3 and mask.shape[-2] == mask.shape[-1]
    mask = torch.cat((columns, mask) if front else (mask, columns), dim=-1)
    return extend_positions(mask, length, front) if square else mask


def extend_positions(table: torch.Tensor, length: int, front: bool) -> torch.Tensor:
    """Extend a ``(..., sequence, dim)`` rotary table or mask to ``length`` rows with copies of its edge row."""
    extra = length - table.shape[-2]
    if extra <= 0:
        return table
    edge = table[..., :1, :] if front else table[..., -1:, :]
    rows = edge.expand(*edge.shape[:-2], extra, edge.shape[-1])
    return torch.cat((rows, table) if front else (table, rows), dim=-2)


def _device(args: tuple, kwargs: dict) -> torch.device:
    return next(value.device for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))


def _is_causal(layer: nn.Module) -> bool:
    """Whether the layer's attention is causal (transformers' attention modules say so in ``is_causal``)."""
    return any(getattr(module, "is_causal", False) is True for module in layer.modules())


def _plain_mask(batch: int, length: int, causal: bool, device: torch.device) -> torch.Tensor:
    """The boolean mask a layer without one implies: causal (or full) attention over ``length`` positions."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril()
    return mask.expand(batch, 1, length, length)


def _mask_prompt_keys(mask: torch.Tensor, batch: int, rows: list[int], length: int, front: bool) -> torch.Tensor:
    """``mask`` with the ``length`` prompt key columns masked for ``rows`` (their placeholders, never attended)."""
    mask = mask.expand(batch, *mask.shape[1:]).clone() if mask.shape[0] != batch else mask.clone()
    columns = slice(0, length) if front else slice(mask.shape[-1] - length, mask.shape[-1])
    blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    index = torch.tensor(rows, device=mask.device)
    mask[index, ..., columns] = blocked
    return mask
