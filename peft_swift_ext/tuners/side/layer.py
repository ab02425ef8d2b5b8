"""The Side tuner layer: ``σ(α)·main + (1-σ(α))·side_net(input)`` on a module's output."""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Mapping

import torch
from torch import nn

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer, device_and_dtype
from ...core.rows import current_rows, per_row, plan_rows, split_plan, structure_key
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
        rows = current_rows()
        names = (
            list(self.adapters_to_apply()) if rows is None else [n for n in dict.fromkeys(rows) if n in self.side_net]
        )
        recorder = _loss_recorder(self.base_layer) if names else None
        with recorder.recording() if recorder is not None else contextlib.nullcontext() as loss_calls:
            output = self.base_layer(*args, **kwargs)
        if not names:
            return output
        positions = list(dict.fromkeys(self.target_hidden_pos[name] for name in names))
        unblended = [self._value(output, position) for position in positions]
        if rows is None:
            output = self._blend(output, names, args, kwargs)
        else:
            output = self._blend_rows(output, rows, names, args, kwargs)
        if isinstance(self.base_layer, RootCall):
            blended = [self._value(output, position) for position in positions]
            output = self._loss_of_blended(output, recorder, loss_calls, list(zip(unblended, blended, strict=True)))
        return output

    def _source(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        source_pos = self.source_hidden_pos[name]
        source = ArgumentSlot(self.base_layer, source_pos).get(args, kwargs)
        if not isinstance(source, torch.Tensor):
            raise ValueError(
                f"SideConfig.source_hidden_pos={source_pos!r} selects no tensor in the call of {self.module_name} "
                f"(got {type(source).__name__})"
            )
        return source

    def _blend(self, output, names: list[str], args: tuple, kwargs: dict):
        for name in names:
            target_pos = self.target_hidden_pos[name]
            blended = self.blend(name, self._source(name, args, kwargs), self._value(output, target_pos))
            output = replace_output_value(output, target_pos, blended, _FIELD, self.module_name)
        return output

    def _blend_rows(self, output, rows: tuple[str, ...], names: list[str], args: tuple, kwargs: dict):
        """Blend each row of a mixed batch with its own adapter's side network (``names``: those the rows name), all
        rows in one pass."""
        batch = self._value(output, self.target_hidden_pos[names[0]]).shape[0]
        plan = plan_rows(rows, self.side_net, batch, self.module_name)

        def key(name: str):
            return self.source_hidden_pos[name], self.target_hidden_pos[name], structure_key(self.side_net[name])

        for group in split_plan(plan, key):
            first = group.adapters[0]
            source = self._source(first, args, kwargs)[group.rows]
            main = self._value(output, self.target_hidden_pos[first])
            blends = [_SideBlend(self.side_net[name], self.side_alpha[name]) for name in group.adapters]
            blended = main.clone()
            blended[group.rows] = per_row(blends, group.index, source, main[group.rows]).to(main.dtype)
            output = replace_output_value(output, self.target_hidden_pos[first], blended, _FIELD, self.module_name)
        return output

    def _value(self, output, position) -> torch.Tensor:
        return output_value(output, position, _FIELD, self.module_name)

    def _loss_of_blended(self, output, recorder: RecordingLoss | None, calls: list | None, swaps: list) -> object:
        """The root model's output with its loss computed from the blended values, the model's own way.

        The model computed its loss inside its forward, from its own (unblended) output. Each call the model made to
        its ``loss_function`` with an unblended value (``calls``: their ``(args, kwargs, result)``) is made again with
        the blended one (``swaps``: ``(unblended, blended)`` pairs), and the loss is corrected by the difference (so a
        term the model adds to it, such as an auxiliary loss, is kept).
        """
        results = {id(result) for _, _, result in calls or ()}
        if isinstance(output, Mapping):
            loss = output.get("loss")
        else:  # a tuple (return_dict=False): the loss is the element loss_function returned
            loss = next((item for item in output if id(item) in results), None) if isinstance(output, tuple) else None
        if recorder is None or not calls:
            if loss is not None:
                raise ValueError(
                    f"{self.module_name} computed its loss from its unblended output, not through "
                    "`loss_function`, so the Side adapter on the model cannot make the loss follow the blend: call "
                    "it without labels and compute the loss from the blended output"
                )
            return output

        def swap(value):
            return next((new for old, new in swaps if value is old), value)

        corrected = loss
        for args, kwargs, result in calls:
            if not any(value is old for value in (*args, *kwargs.values()) for old, _ in swaps):
                continue  # a loss of other values: the blend does not reach it
            again = recorder.function(*map(swap, args), **{key: swap(value) for key, value in kwargs.items()})
            if corrected is result:
                corrected = again
            elif isinstance(corrected, torch.Tensor) and isinstance(result, torch.Tensor):
                corrected = corrected - result + again  # the model added to its loss_function's result
            else:
                raise ValueError(
                    f"{self.module_name} returned a loss the Side adapter on the model cannot compute again from "
                    "the blended output; call it without labels and compute the loss from the blended output"
                )
        if corrected is loss:
            return output
        if isinstance(output, Mapping):
            output["loss"] = corrected
            return output
        items = [corrected if item is loss else item for item in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)

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


class _SideBlend(nn.Module):
    """One adapter's ``σ(α)·main + (1-σ(α))·side_net(source)`` as a module (its own network and α, not copies)."""

    def __init__(self, side_net: nn.Module, alpha: nn.Parameter) -> None:
        super().__init__()
        self.side_net = side_net
        self.alpha = alpha

    def forward(self, source: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        weight = torch.sigmoid(self.alpha)
        return weight * main.to(self.alpha.dtype) + (1 - weight) * self.side_net(source.to(self.alpha.dtype))


_FIELD = "SideConfig.target_hidden_pos"
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


class RecordingLoss:
    """The root model's ``loss_function`` while a Side layer sits on the model: the same function, whose calls a
    forward of that layer records (per thread), so that the loss can be computed again from the blended output.

    Args:
        function: the model's own ``loss_function``.
    """

    def __init__(self, function) -> None:
        self.function = function
        self._local = threading.local()

    def __call__(self, *args, **kwargs):
        result = self.function(*args, **kwargs)
        calls = getattr(self._local, "calls", None)
        if calls is not None:
            calls.append((args, kwargs, result))
        return result

    @contextlib.contextmanager
    def recording(self):
        """Record the calls made in this thread until the block ends; yields the list they go to."""
        previous = getattr(self._local, "calls", None)
        self._local.calls = []
        try:
            yield self._local.calls
        finally:
            self._local.calls = previous

    def __reduce__(self):
        # copy.deepcopy and pickling of the model: a fresh recorder of the same function
        return (type(self), (self.function,))


def _loss_recorder(base_layer: nn.Module) -> RecordingLoss | None:
    if not isinstance(base_layer, RootCall):
        return None
    recorder = getattr(base_layer.forward.__self__, "loss_function", None)
    return recorder if isinstance(recorder, RecordingLoss) else None


# Where the model's own loss_function override (``_loss_function``) was before a RecordingLoss took its place.
_NO_OVERRIDE = object()


def attach_to_root(root: nn.Module, layer: SideLayer) -> None:
    """Put ``layer`` (wrapping a :class:`RootCall` of ``root``) inside ``root`` and route its calls through it.

    A model with a ``loss_function`` (Hugging Face models) gets a :class:`RecordingLoss` in its place, so that the
    loss it computes follows the blend.
    """
    setattr(root, ROOT_SIDE_ATTR, layer)
    root.forward = RoutedForward(root)
    # loss_type None: the model computes no loss of its own (reading loss_function would only warn)
    known = getattr(root, "loss_type", None) is not None or "_loss_function" in vars(root)
    function = getattr(root, "loss_function", None) if known else None
    if callable(function) and not isinstance(function, RecordingLoss):
        layer.saved_loss_override = vars(root).get("_loss_function", _NO_OVERRIDE)
        root.loss_function = RecordingLoss(function)


def detach_from_root(root: nn.Module) -> None:
    """Undo :func:`attach_to_root`: the model's own ``forward`` and ``loss_function`` again, no Side layer in it."""
    layer = getattr(root, ROOT_SIDE_ATTR)
    vars(root).pop("forward", None)
    if isinstance(getattr(root, "loss_function", None), RecordingLoss):
        saved = vars(layer).get("saved_loss_override", _NO_OVERRIDE)
        if saved is _NO_OVERRIDE:
            vars(root).pop("_loss_function", None)
        else:
            root._loss_function = saved
    delattr(root, ROOT_SIDE_ATTR)
