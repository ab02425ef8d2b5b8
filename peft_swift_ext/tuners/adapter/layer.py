"""The Adapter tuner layer: ``h -> h + W2·act(W1·h)`` on a module's output."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.activations import ACT2CLS

from ...compat import move_adapter_to_base_device
from ...core.layer import SwiftTunerLayer
from ...core.rows import current_rows, per_row, plan_rows, split_plan, structure_key
from ...core.slots import Position, output_value, replace_output_value

_FIELD = "AdapterConfig.hidden_pos"
# One lock for all layers (a lock attribute would make the model impossible to deepcopy); it guards only
# the install/remove bookkeeping of intercepted methods, never a forward.
_INTERCEPTION_LOCK = threading.Lock()


class AdapterLayer(SwiftTunerLayer):
    """Wraps a module and adds bottleneck adapters to the hidden state it (or one of its methods) returns.

    Args:
        base_layer: the wrapped module.
        module_name: its name in the model, for error messages.
    """

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_act", "hidden_pos", "method_name")
    tuner_name = "Adapter"

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(base_layer)
        self.module_name = module_name
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.hidden_pos: dict[str, Position | None] = {}
        self.method_name: dict[str, str] = {}
        # Methods other than forward are intercepted only while this layer runs; concurrent calls share it.
        self._shadow_users = 0

    def update_layer(
        self, adapter_name: str, dim: int, adapter_length: int, act_layer: str, hidden_pos, method_name: str
    ) -> None:
        """Create adapter ``adapter_name`` (SWIFT's init: Xavier-uniform weights, N(0, 1e-6²) biases)."""
        down, up = nn.Linear(dim, adapter_length), nn.Linear(adapter_length, dim)
        for linear in (down, up):
            if linear.weight.device.type != "meta":
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_act[adapter_name] = ACT2CLS[act_layer]()
        self.hidden_pos[adapter_name] = hidden_pos
        self.method_name[adapter_name] = method_name
        move_adapter_to_base_device(self, adapter_name)

    def adapt(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + up(act(down(hidden)))`` computed in the adapter's dtype, returned in ``hidden``'s dtype."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        if hidden.shape[-1] != down.in_features:
            raise ValueError(
                f"AdapterConfig.dim={down.in_features} does not fit {self.module_name}: its hidden state has size "
                f"{hidden.shape[-1]} in the last dimension"
            )
        x = hidden.to(down.weight.dtype)
        return (x + up(self.adapter_act[adapter_name](down(x)))).to(hidden.dtype)

    def adapt_output(self, output, adapter_names: list[str]):
        """Apply the given adapters, in order, to the selected hidden state of ``output``."""
        for name in adapter_names:
            position = self.hidden_pos[name]
            hidden = output_value(output, position, _FIELD, self.module_name)
            output = replace_output_value(output, position, self.adapt(name, hidden), _FIELD, self.module_name)
        return output

    def adapt_rows(self, output, rows: tuple[str, ...], method: str):
        """Apply to each row of a mixed batch its own adapter (those of ``method``), all rows in one pass.

        Args:
            output: what the module (or its method) returned.
            rows: the adapter name of each row.
            method: the method whose return value ``output`` is.
        """
        owned = [name for name in self.adapter_down if self.method_name[name] == method]
        named = [name for name in dict.fromkeys(rows) if name in owned]
        if not named:
            return output
        batch = output_value(output, self.hidden_pos[named[0]], _FIELD, self.module_name).shape[0]
        plan = plan_rows(rows, owned, batch, self.module_name)
        for group in split_plan(plan, lambda name: (self.hidden_pos[name], structure_key(self.bottleneck(name)))):
            position = self.hidden_pos[group.adapters[0]]
            hidden = output_value(output, position, _FIELD, self.module_name)
            x = hidden[group.rows].to(self.adapter_down[group.adapters[0]].weight.dtype)
            delta = per_row([self.bottleneck(name) for name in group.adapters], group.index, x)
            adapted = hidden.clone()
            adapted[group.rows] = (x + delta).to(hidden.dtype)
            output = replace_output_value(output, position, adapted, _FIELD, self.module_name)
        return output

    def bottleneck(self, adapter_name: str) -> nn.Sequential:
        """``up(act(down(x)))`` of one adapter as one module (the adapter's own layers, not copies).

        Args:
            adapter_name: the adapter.
        """
        return nn.Sequential(
            self.adapter_down[adapter_name], self.adapter_act[adapter_name], self.adapter_up[adapter_name]
        )

    def _adapt(self, output, method: str):
        rows = current_rows()
        if rows is not None:
            return self.adapt_rows(output, rows, method)
        return self.adapt_output(
            output, [name for name in self.adapters_to_apply() if self.method_name[name] == method]
        )

    def forward(self, *args, **kwargs):
        with self._methods_intercepted():
            output = self.base_layer(*args, **kwargs)
        return self._adapt(output, "forward")

    @contextmanager
    def _methods_intercepted(self) -> Iterator[None]:
        """While the base layer runs, route its own calls of adapted methods through the adapters.

        The interceptor is an instance attribute of the wrapped module only during the call (the class and
        ``forward`` are never touched), and it reads the active adapters when called. It goes on the innermost
        module, whose own code calls the method, not on another tuner's layer in between (which would only
        shadow the method).
        """
        methods = sorted({self.method_name[name] for name in self.adapter_down} - {"forward"})
        if not methods:
            yield
            return
        base = self.get_base_layer()
        with _INTERCEPTION_LOCK:
            if self._shadow_users == 0:
                for method in methods:
                    vars(base)[method] = self._interceptor(getattr(base, method), method)
            self._shadow_users += 1
        try:
            yield
        finally:
            with _INTERCEPTION_LOCK:
                self._shadow_users -= 1
                if self._shadow_users == 0:
                    for method in methods:
                        vars(base).pop(method, None)

    def _interceptor(self, original, method: str):
        def adapted_method(*args, **kwargs):
            return self._adapt(original(*args, **kwargs), method)

        # Callers may inspect the method (transformers' apply_chunking_to_forward counts its parameters).
        adapted_method.__signature__ = inspect.signature(original)
        return adapted_method
