"""The Side tuner layer: ``σ(α)·main + (1-σ(α))·side_net(input)`` on a module's output."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer, device_and_dtype
from ...core.slots import ArgumentSlot, Position, output_value, replace_output_value
from .networks import SIDE_NETWORKS


class SideLayer(SwiftTunerLayer):
    """Wraps a module and blends its output with a side network's output; adapters apply in activation order.

    Args:
        base_layer: the wrapped module.
        module_name: its name in the model, for error messages.
    """

    adapter_layer_names = ("side_net", "side_alpha")
    other_param_names = ("source_hidden_pos", "target_hidden_pos")
    tuner_name = "Side"

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(base_layer)
        self.module_name = module_name
        self.side_net = nn.ModuleDict()
        self.side_alpha = nn.ParameterDict()
        self.source_hidden_pos: dict[str, Position] = {}
        self.target_hidden_pos: dict[str, Position] = {}

    def update_layer(
        self, adapter_name: str, dim: int, side_module_name: str, source_hidden_pos, target_hidden_pos
    ) -> None:
        """Create a side network (PyTorch's default init) and ``α = 0`` (an even blend at the start)."""
        self.side_net[adapter_name] = SIDE_NETWORKS[side_module_name](dim)
        self.side_alpha[adapter_name] = nn.Parameter(torch.zeros(()))
        self.source_hidden_pos[adapter_name] = source_hidden_pos
        self.target_hidden_pos[adapter_name] = target_hidden_pos
        move_adapter_to_base_device(self, adapter_name)

    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        for name in self.adapters_to_apply():
            source_pos, target_pos = self.source_hidden_pos[name], self.target_hidden_pos[name]
            source = ArgumentSlot(self.base_layer, source_pos).get(args, kwargs)
            if not isinstance(source, torch.Tensor):
                raise ValueError(
                    f"SideConfig.source_hidden_pos={source_pos!r} selects no tensor in the call of {self.module_name} "
                    f"(got {type(source).__name__})"
                )
            main = output_value(output, target_pos, "SideConfig.target_hidden_pos", self.module_name)
            blended = self.blend(name, source, main)
            output = replace_output_value(
                output, target_pos, blended, "SideConfig.target_hidden_pos", self.module_name
            )
        return output

    def remove_probes(self) -> None:
        """On the root model, give it back its own ``forward`` and take this layer out of it."""
        if isinstance(self.base_layer, RootCall):
            detach_from_root(self.base_layer.forward.__self__)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # On the root the wrapped module is a RootCall, which holds no tensors: the root model's own decide.
        if isinstance(base_layer, RootCall):
            root, own = base_layer.root, {id(t) for t in (*self.parameters(), *self.buffers())}
            return device_and_dtype(t for t in (*root.parameters(), *root.buffers()) if id(t) not in own)
        return super()._get_base_layer_device_and_dtype(base_layer)

    def blend(self, adapter_name: str, source: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """``σ(α)·main + (1-σ(α))·side_net(source)`` in the side network's dtype, returned in ``main``'s dtype."""
        alpha = self.side_alpha[adapter_name]
        try:
            side = self.side_net[adapter_name](source.to(alpha.dtype))
        except RuntimeError as error:
            raise ValueError(
                f"the side network of {self.module_name} cannot take its input of shape {tuple(source.shape)} "
                f"(SideConfig.source_hidden_pos={self.source_hidden_pos[adapter_name]!r}, dim, side_module_name): "
                f"{error}"
            ) from None
        if side.shape != main.shape:
            raise ValueError(
                f"the side network of {self.module_name} outputs shape {tuple(side.shape)} but the blended output "
                f"has shape {tuple(main.shape)}; check SideConfig.dim and target_hidden_pos"
            )
        weight = torch.sigmoid(alpha)
        return (weight * main.to(alpha.dtype) + (1 - weight) * side).to(main.dtype)


# The attribute under which a Side layer on the root model lives inside that model.
ROOT_SIDE_ATTR = "root_side"


class RootCall(nn.Module):
    """Stands in for the root model inside its own Side layer: runs the model's class ``forward``.

    The model owns the Side layer, so the layer cannot own the model: this holds it as a plain attribute, and
    its instance ``forward`` (the model's bound class method) also gives the argument names that
    ``source_hidden_pos`` is resolved against.

    Args:
        root: the model the Side layer is attached to.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.forward = type(root).forward.__get__(root)

    @property
    def root(self) -> nn.Module:
        """The model this stands in for."""
        return self.forward.__self__


class RoutedForward:
    """The root model's instance ``forward`` while it has a Side layer: the call goes through that layer.

    A class rather than a closure so that ``copy.deepcopy`` of the model routes the copy through its own layer;
    it carries the original signature for code that inspects ``model.forward`` (e.g. ``generate``).

    Args:
        root: the model whose calls are routed.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.__signature__ = inspect.signature(type(root).forward.__get__(root))

    def __call__(self, *args, **kwargs):
        return getattr(self.root, ROOT_SIDE_ATTR)(*args, **kwargs)


def attach_to_root(root: nn.Module, layer: SideLayer) -> None:
    """Put ``layer`` (wrapping a :class:`RootCall` of ``root``) inside ``root`` and route its calls through it."""
    setattr(root, ROOT_SIDE_ATTR, layer)
    root.forward = RoutedForward(root)


def detach_from_root(root: nn.Module) -> None:
    """Undo :func:`attach_to_root`: the model's own ``forward`` again, and no Side layer inside it."""
    vars(root).pop("forward", None)
    delattr(root, ROOT_SIDE_ATTR)
