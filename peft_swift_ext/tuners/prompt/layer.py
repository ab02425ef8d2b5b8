"""The Prompt tuner layer: learnable tokens added to (first layer) or written into (deeper layers) a sequence."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer
from ...core.slots import ArgumentSlot, Position


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

    def update_layer(self, adapter_name: str, dim: int, prompt_length: int, settings: PromptSettings) -> None:
        """Create the ``(1, prompt_length, dim)`` tokens of ``adapter_name`` (SWIFT's Xavier-uniform init)."""
        token = nn.Parameter(torch.zeros(1, prompt_length, dim))
        if token.device.type != "meta":
            nn.init.xavier_uniform_(token)
        self.prompt_token[adapter_name] = token
        self.prompt_settings[adapter_name] = settings
        move_adapter_to_base_device(self, adapter_name)

    def forward(self, *args, **kwargs):
        names = list(self.adapters_to_apply())
        if not names:
            return self.base_layer(*args, **kwargs)
        settings = [self.prompt_settings[name] for name in names]
        self._check_compatible(names, settings)
        first = settings[0]
        embedding = ArgumentSlot(self.base_layer, first.embedding_pos)
        hidden = embedding.get(args, kwargs)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(
                f"PromptConfig.embedding_pos={first.embedding_pos!r} does not select a (batch, sequence, hidden) "
                f"tensor in the call of {self.module_name}; got {type(hidden).__name__}"
            )
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

    def _check_compatible(self, names: list[str], settings: list[PromptSettings]) -> None:
        if len({replace(s, extracts=False) for s in settings}) > 1:
            raise ValueError(
                f"prompt adapters {names} are active together in {self.module_name} but differ in whether this is "
                "their first layer, in attach_front or in argument positions / mask value; activate them one at a time"
            )

    def _spans(self, names: list[str], total: int, front: bool) -> dict[str, tuple[int, int]]:
        """Where each adapter's tokens sit in a sequence of ``total`` positions: ``name -> (start, length)``.

        The first adapter's tokens are nearest the original sequence (they were added first).
        """
        spans, offset = {}, 0
        for name in reversed(names) if front else names:
            length = self.prompt_token[name].shape[1]
            spans[name] = (offset, length) if front else (total - self._total_length(names) + offset, length)
            offset += length
        return spans

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
        if first.concatenates:
            for name in names:
                tokens = self._tokens(name, hidden)
                hidden = torch.cat((tokens, hidden) if front else (hidden, tokens), dim=1)
            return hidden
        if hidden.shape[1] < self._total_length(names):
            raise ValueError(
                f"{self.module_name} is a deeper prompt layer but its input has only {hidden.shape[1]} positions; "
                "the first targeted layer must run before it"
            )
        pieces, cursor = [], 0
        for name, (start, length) in sorted(self._spans(names, hidden.shape[1], front).items(), key=lambda s: s[1]):
            pieces += [hidden[:, cursor:start], self._tokens(name, hidden)]
            cursor = start + length
        pieces.append(hidden[:, cursor:])
        return torch.cat(pieces, dim=1)

    def _replace_argument(self, args: tuple, kwargs: dict, position, extend) -> tuple[tuple, dict]:
        """Pass ``extend(value)`` instead of the argument at ``position`` (mask / rotary table), if it was given."""
        if position is None:
            return args, kwargs
        slot = ArgumentSlot(self.base_layer, position)
        value = slot.get(args, kwargs)
        return (args, kwargs) if value is None else slot.replace(args, kwargs, extend(value))

    def _remove_tokens(self, output, names: list[str], extracted: list[str], front: bool):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        spans = self._spans(names, hidden.shape[1], front)
        keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        for name in extracted:
            start, length = spans[name]
            keep[start : start + length] = False
        hidden = hidden[:, keep]
        if isinstance(output, torch.Tensor):
            return hidden
        return type(output)((hidden, *output[1:]))


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
    if square:
        edge = mask[..., :1, :] if front else mask[..., -1:, :]
        rows = edge.expand(*edge.shape[:-2], extra, edge.shape[-1])
        mask = torch.cat((rows, mask) if front else (mask, rows), dim=-2)
    return mask


def extend_positions(table: torch.Tensor, length: int, front: bool) -> torch.Tensor:
    """Extend a ``(..., sequence, dim)`` rotary table to ``length`` positions with copies of its edge row."""
    extra = length - table.shape[-2]
    if extra <= 0:
        return table
    edge = table[..., :1, :] if front else table[..., -1:, :]
    rows = edge.expand(*edge.shape[:-2], extra, edge.shape[-1])
    return torch.cat((rows, table) if front else (table, rows), dim=-2)
