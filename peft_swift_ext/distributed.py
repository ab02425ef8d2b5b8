"""Helpers for training PEFT / SWIFT adapters with DDP, FSDP2 (``torch.distributed.fsdp.fully_shard``) and
DeepSpeed: sharding with one unit per decoder layer and per added module, saving the gathered full adapters, and
0-d parameters. See ``docs/guides/distributed.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .core.contract import TunerHost
from .core.decoder_layers import repeated_block_lists
from .core.keys import adapter_tensors
from .core.layer import SwiftTunerLayer
from .core.sharding import full_numel, is_sharded


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Entries of every list of two or more blocks of one class (decoder layers, encoder layers)."""
    return [
        block for _, layers in repeated_block_lists(model) for block in layers if any(True for _ in block.parameters())
    ]


def _added_networks(model: nn.Module) -> list[nn.Module]:
    """The per-adapter modules of this package's tuner layers that own parameters and are called as modules."""
    networks = []
    for layer in model.modules():
        if not isinstance(layer, SwiftTunerLayer):
            continue
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if isinstance(container, nn.ModuleDict):
                networks.extend(m for m in container.values() if _is_callable_unit(m))
    return networks


def _is_callable_unit(module: nn.Module) -> bool:
    # fully_shard needs a module that runs (containers such as ModuleList have no forward) and owns parameters
    runs = type(module).forward is not nn.Module.forward and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    return runs and any(True for _ in module.parameters())


def wrap_modules(model: nn.Module, adapter_networks: bool = True) -> list[nn.Module]:
    """The modules that get their own FSDP unit, innermost first (the order ``fully_shard`` needs).

    Args:
        model: a ``PeftModel``, ``SwiftModel`` or plain model.
        adapter_networks: also give each module a tuner adds (Res-Tuning bypass, Side network, SCEdit and
            Adapter blocks, LLaMA-PRO blocks) its own unit, so its parameters are gathered only while it runs.
    """
    chosen = {id(m): m for m in _repeated_blocks(model)}
    if adapter_networks:
        chosen.update({id(m): m for m in _added_networks(model)})
    # post-order: a unit's children are sharded before it
    order = {id(m): index for index, m in enumerate(reversed(list(model.modules())))}
    return sorted(chosen.values(), key=lambda m: order[id(m)])


def wrap_class_names(model: nn.Module, adapter_networks: bool = True) -> list[str]:
    """Class names of :func:`wrap_modules`, for ``accelerate``'s ``fsdp_transformer_layer_cls_to_wrap``
    (``FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=...)``).

    Args:
        model: the model as it will be given to ``accelerator.prepare``.
        adapter_networks: as in :func:`wrap_modules`.
    """
    return sorted({type(m).__name__ for m in wrap_modules(model, adapter_networks)})


def fully_shard_peft_model(
    model: nn.Module, mesh=None, adapter_networks: bool = True, reshard_after_forward: bool = True, **kwargs
) -> nn.Module:
    """Shard ``model`` with FSDP2: one unit per module of :func:`wrap_modules`, then the root.

    Frozen base weights are sharded like the rest but get no gradients; only trainable parameters are
    reduce-scattered. ``fully_shard`` cannot shard 0-d parameters (Side's ``side_alpha``): they stay replicated
    on every rank and their gradients are averaged over the ranks as soon as they are accumulated (so every
    rank must run the backward pass through them). Build the optimizer *after* this call (the parameters
    become ``DTensor``\\ s).

    Args:
        model: a ``PeftModel``, ``SwiftModel`` or plain model, on the device it will train on.
        mesh: the ``DeviceMesh`` to shard over; None uses all ranks of the default process group.
        adapter_networks: as in :func:`wrap_modules`.
        reshard_after_forward: passed to ``fully_shard`` for the inner units (the root keeps FSDP's default).
        kwargs: further ``fully_shard`` options (``mp_policy``, ``offload_policy``, ...).

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in model.parameters() if p.dim() == 0}
    if scalars:
        kwargs["ignored_params"] = set(kwargs.get("ignored_params", ())) | scalars
        group = mesh.get_group() if mesh is not None else None
        for param in scalars:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(functools.partial(_average_grad, group=group))
    for module in wrap_modules(model, adapter_networks):
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _average_grad(param: torch.Tensor, group=None) -> None:
    """Average a replicated parameter's gradient over the ranks (FSDP2 leaves scalar parameters alone)."""
    dist.all_reduce(param.grad, group=group)
    param.grad.div_(dist.get_world_size(group))


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    wrapped = isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor PEFT's ``save_pretrained`` would write, gathered to full size, under the model's own keys.

    A collective: call it on every rank. Only adapter tensors are gathered, never the base weights. Works on
    ``PeftModel`` (sharded or not); returns CPU tensors.

    Args:
        model: a ``PeftModel``, possibly FSDP2-sharded, ZeRO-3 partitioned, or inside
            ``DistributedDataParallel`` / a DeepSpeed engine.
    """
    model = _unwrap_ddp(model)
    if not isinstance(model, PeftModel) or isinstance(model, TunerHost):
        raise TypeError(
            f"full_adapter_state_dict needs a PeftModel of one tuner type, got {type(model).__name__}; a SwiftModel "
            "is saved with save_pretrained_full"
        )
    adapters = list(model.peft_config)
    # ZeRO-3 keeps only a partition in each parameter: gather the adapter ones (trainable, or named after an
    # adapter) while the state dict is read. FSDP2's DTensors are gathered one by one below.
    candidates = [
        param
        for name, param in model.named_parameters()
        if param.requires_grad or any(f".{adapter}." in f".{name}." for adapter in adapters)
    ]
    full = {}
    with _zero3_gathered(candidates):
        state = model.state_dict(keep_vars=True)
        # PEFT's own filter picks the adapter tensors; it returns the same tensor objects under new keys.
        wanted: set[int] = set()
        for adapter in adapters:
            picked = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter)
            wanted.update(id(t) for t in picked.values())
        for key, value in state.items():
            if id(value) in wanted:
                whole = value.full_tensor() if hasattr(value, "full_tensor") else value
                full[key] = _saved_shape(value, whole.detach().cpu().clone())
    return full


def _zero3_gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """DeepSpeed's ``GatheredParameters`` over the ZeRO-3 partitioned ones among ``params`` (a collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def save_pretrained_full(model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> None:
    """Save the full (unsharded) adapters from rank 0; a collective, call it on every rank.

    A ``PeftModel`` gathers only its adapter tensors (:func:`full_adapter_state_dict`) and writes PEFT's
    layout. A ``SwiftModel`` (SWIFT's layout) has its sharded adapter parameters replaced by full ones for
    the duration of the save; base weights stay sharded. Models without sharded tensors (DDP, single
    process) are saved from rank 0 as they are.

    Args:
        model: a ``PeftModel`` or ``SwiftModel``, possibly FSDP2-sharded, ZeRO-3 partitioned, or inside
            ``DistributedDataParallel`` / a DeepSpeed engine.
        save_directory: the checkpoint folder (written by rank 0 only).
        kwargs: passed to ``save_pretrained`` (e.g. ``selected_adapters``, ``safe_serialization``).
    """
    model = _unwrap_ddp(model)
    if isinstance(model, PeftModel) and not isinstance(model, TunerHost):
        state = full_adapter_state_dict(model)
        if _rank() == 0:
            model.save_pretrained(save_directory, state_dict=state, **kwargs)
    else:
        with _full_adapter_parameters(model):
            if _rank() == 0:
                model.save_pretrained(save_directory, **kwargs)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _full_adapter_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block, every sharded adapter parameter of a ``SwiftModel`` is replaced by its full value
    (a collective), and one reshaped by :func:`vectorize_scalar_parameters` by a 0-d one; the very same
    parameter objects are put back afterwards, so optimizers keep working."""
    adapter_ids = {
        id(tensor)
        for name in getattr(model, "adapters", [])
        for _, tensor in adapter_tensors(model.get_base_model(), name).values()
    }
    swapped = []
    try:
        with _zero3_gathered([p for p in model.parameters() if id(p) in adapter_ids]):
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is None or id(param) not in adapter_ids:
                        continue
                    if hasattr(param, "full_tensor") or getattr(param, _SCALAR_MARK, False):
                        whole = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
                        saved = nn.Parameter(_saved_shape(param, whole), requires_grad=param.requires_grad)
                        module._parameters[name] = saved
                        swapped.append((module, name, param))
            yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


_SCALAR_MARK = "_peft_swift_ext_was_0d"


def vectorize_scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Give every 0-d parameter of ``model`` (Side's ``side_alpha``) the shape ``(1,)``, in place, for DeepSpeed.

    Call it before ``deepspeed.initialize`` and before building an optimizer (likewise before
    ``accelerator.prepare`` or a ``Trainer`` with a DeepSpeed config, which call ``deepspeed.initialize``;
    those two paths are not tested): DeepSpeed's initial broadcast views every parameter as bytes, which a
    0-d tensor cannot do ("self.dim() cannot be 0 to view Float as Byte"). The parameter objects stay the
    same and keep their values; Side's blend broadcasts a ``(1,)`` weight like a scalar, so training is
    unchanged.
    :func:`save_pretrained_full` and :func:`full_adapter_state_dict` write these tensors with shape ``()``
    again, the shape ms-swift's checkpoints store; a plain ``save_pretrained`` would write ``(1,)``, so call
    :func:`restore_scalar_parameters` first when saving that way after training.

    Args:
        model: the model to be given to DeepSpeed, not yet wrapped.

    Returns:
        The parameters that were reshaped (empty when there are none).
    """
    scalars = [param for param in model.parameters() if param.dim() == 0]
    for param in scalars:
        param.data = param.data.reshape(1)
        setattr(param, _SCALAR_MARK, True)
    return scalars


def restore_scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Undo :func:`vectorize_scalar_parameters`: shape ``()`` again for the parameters it reshaped.

    For after training (DeepSpeed keeps using the shape it was given). Under ZeRO-3 call it inside
    ``deepspeed.zero.GatheredParameters`` of those parameters, or leave them to :func:`save_pretrained_full`.

    Args:
        model: the model, or the DeepSpeed engine around it.

    Returns:
        The parameters that got shape ``()`` back.
    """
    restored = []
    for param in _unwrap_ddp(model).parameters():
        if getattr(param, _SCALAR_MARK, False) and param.shape == (1,):
            param.data = param.data.reshape(())
            delattr(param, _SCALAR_MARK)
            restored.append(param)
    return restored


def _saved_shape(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # a parameter reshaped by vectorize_scalar_parameters is saved 0-d, as ms-swift and PEFT checkpoints hold it
    return value.reshape(()) if getattr(param, _SCALAR_MARK, False) and value.numel() == 1 else value


def seed_per_rank(seed: int) -> int:
    """Seed torch's global generator with ``seed + rank`` and return that seed.

    Random choices that must *differ* between ranks (NEFTune's noise, dropout masks) then are independent per
    rank and reproducible. Choices that must be the same on every rank have their own generator (LISA's
    ``LisaConfig.seed``) or are computed from all-reduced values (GaLore's projection), so this does not
    touch them.

    Args:
        seed: the run's seed, the same on every rank.
    """
    rank_seed = seed + _rank()
    torch.manual_seed(rank_seed)
    return rank_seed


__all__ = [
    "full_adapter_state_dict",
    "full_numel",
    "fully_shard_peft_model",
    "is_sharded",
    "restore_scalar_parameters",
    "save_pretrained_full",
    "seed_per_rank",
    "vectorize_scalar_parameters",
    "wrap_class_names",
    "wrap_modules",
]
