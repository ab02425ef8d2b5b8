"""LLaMA-PRO's new blocks: zero-initialised copies of a decoder layer run right after it."""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.cache_utils import Cache

from ...compat import AuxiliaryTrainingWrapper
from ...core.layer import SwiftTunerLayer, new_parameters_go_to_meta
from ...core.rows import current_rows, plan_rows


class LlamaProLayer(SwiftTunerLayer):
    """A decoder layer followed by each active adapter's new blocks.

    ``llamapro_blocks[adapter]`` is an ``nn.ModuleList`` of copies of the wrapped layer; every block takes the
    previous output as its hidden states and the same masks, position embeddings and cache as the wrapped layer.
    Merging keeps the blocks running (they cannot be folded into weights); unloading after a merge turns them
    into ordinary decoder layers (see ``LlamaProModel``).

    Args:
        base_layer: the decoder layer ending a group.
    """

    adapter_layer_names = ("llamapro_blocks",)
    tuner_name = "LLaMA-PRO"
    # merging only marks the blocks: they cannot be folded into weights, and unloading keeps the marked ones
    merges_by_marking = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.llamapro_blocks = nn.ModuleDict()

    def update_layer(self, adapter_name: str, num_blocks: int, output_projections: list[str]) -> None:
        """Add ``num_blocks`` identity-initialised copies of the wrapped layer for ``adapter_name``.

        Inside PEFT's ``low_cpu_mem_usage`` (its ``init_empty_weights``) the copies' parameters are created on the
        meta device, as every other adapter weight is there, to be filled by the checkpoint that is loaded next.
        """
        on_meta = new_parameters_go_to_meta()
        blocks = nn.ModuleList(new_block(self.base_layer, output_projections, on_meta) for _ in range(num_blocks))
        self.llamapro_blocks[adapter_name] = blocks

    def forward(self, hidden_states, *args, **kwargs):
        output = self.base_layer(hidden_states, *args, **kwargs)
        rows = current_rows()
        if rows is not None:
            return self._blocks_rows(output, rows, args, kwargs)
        for name in self.adapters_to_apply():
            for block in self.llamapro_blocks[name]:
                output = _run_block(block, output, args, kwargs)
        return output

    def _blocks_rows(self, output, rows: tuple[str, ...], args: tuple, kwargs: dict):
        """Each row of a mixed batch continues through its own adapter's blocks; other rows skip them.

        Without a KV cache each adapter's blocks run on that adapter's rows only (the batch's work is one adapter's
        blocks over the batch, however many adapters it holds). With a cache, whose slots are batch-wide, every
        adapter's blocks run on the whole batch and each row keeps its own adapter's result.
        """
        hidden = output[0] if isinstance(output, tuple) else output
        batch = hidden.shape[0]
        plan = plan_rows(rows, self.llamapro_blocks, batch, "a LLaMA-PRO layer")
        whole_batch = any(isinstance(value, Cache) for value in (*args, *kwargs.values()))
        result = hidden
        for k, name in enumerate(plan.adapters):
            chosen = plan.rows[plan.index == k]
            if whole_batch:
                continued, block_args, block_kwargs, pick = output, args, kwargs, chosen
            else:
                continued, block_args, block_kwargs = _rows_of((output, args, kwargs), chosen, batch)
                pick = slice(None)
            for block in self.llamapro_blocks[name]:
                continued = _run_block(block, continued, block_args, block_kwargs)
            if result is hidden:
                result = hidden.clone()
            result[chosen] = (continued[0] if isinstance(continued, tuple) else continued)[pick]
        return (result, *output[1:]) if isinstance(output, tuple) else result


#: decoder-layer keyword arguments that are not batch-first even when their length equals the batch size
_NOT_BATCHED = frozenset({"cache_position"})


def _map_tensors(value, fn):
    """``fn`` applied to every tensor of ``value`` (a decoder layer's output, arguments or keyword arguments)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: item if key in _NOT_BATCHED else _map_tensors(item, fn) for key, item in value.items()}
    return value


def _rows_of(value, rows: torch.Tensor, batch: int):
    """``value`` cut to ``rows``: every tensor whose first dimension is the batch; broadcast tensors (first
    dimension 1) and other values as they are."""
    return _map_tensors(value, lambda t: t[rows] if t.dim() and t.shape[0] == batch else t)


def _run_block(block: nn.Module, previous, args: tuple, kwargs: dict):
    """Run one new block on the previous output, in the block's own dtype (it may differ from the base's)."""
    hidden = previous[0] if isinstance(previous, tuple) else previous
    dtype = next(block.parameters()).dtype
    result = block(_cast_floats(hidden, dtype), *_cast_floats(args, dtype), **_cast_floats(kwargs, dtype))
    # Transformers 5 decoder layers return the hidden states; older ones a tuple starting with them.
    result = (result[0] if isinstance(result, tuple) else result).to(hidden.dtype)
    return (result, *previous[1:]) if isinstance(previous, tuple) else result


def _cast_floats(value, dtype: torch.dtype):
    return _map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)


def new_block(layer: nn.Module, output_projections: list[str], on_meta: bool = False) -> nn.Module:
    """A trainable copy of ``layer`` without other tuners' modules, its output projections zeroed.

    Args:
        layer: the decoder layer to copy.
        output_projections: names of the modules whose weight and bias are zeroed.
        on_meta: give the copy meta parameters of the same shapes and dtypes instead of copied values.
    """
    block = plain_copy(layer, on_meta)
    with torch.no_grad():
        for name, module in block.named_modules():
            if name.rpartition(".")[2] in output_projections:
                for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if tensor is not None:
                        tensor.zero_()
    return block


def plain_copy(module: nn.Module, on_meta: bool = False) -> nn.Module:
    """A deep copy of ``module`` in which every tuner layer or wrapper is replaced by a copy of what it wraps.

    Copying the adapters of other tuners into a new block would duplicate their weights under keys nobody saves,
    so each wrapper is pre-seeded in ``deepcopy``'s memo with a copy of its original module (and configs with
    themselves). With ``on_meta`` the parameters are pre-seeded with meta tensors, so no value is copied.
    """
    if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
        return plain_copy(_original_of(module), on_meta)
    memo: dict[int, object] = {}
    if on_meta:
        for param in module.parameters():
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for sub in module.modules():
        if sub is not module and id(sub) not in memo and isinstance(sub, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            memo[id(sub)] = plain_copy(_original_of(sub), on_meta)
        # The model config is shared, not copied: the attention implementation and other settings read at run time
        # must stay the model's own in the new blocks.
        config = sub.__dict__.get("config")
        if config is not None:
            memo[id(config)] = config
    return copy.deepcopy(module, memo)


def _original_of(wrapper: nn.Module) -> nn.Module:
    return wrapper.get_base_layer() if isinstance(wrapper, BaseTunerLayer) else wrapper.original_module


def output_projection_names(layer: nn.Module, output_projections: list[str]) -> list[str]:
    """Names of the modules inside ``layer`` that a new block zeroes."""
    return [name for name, _ in layer.named_modules() if name.rpartition(".")[2] in output_projections]


def set_layer_index(block: nn.Module, index: int) -> None:
    """Point every ``layer_idx`` inside ``block`` (attention's KV-cache slot, the layer's own index) at ``index``."""
    for module in block.modules():
        value = module.__dict__.get("layer_idx")
        if isinstance(value, int) and not isinstance(value, bool):
            module.layer_idx = index
