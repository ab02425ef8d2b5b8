"""Finding SWIFT's ``*_pos`` values in a module's call arguments and in its output.

SWIFT names a tensor either by an int (a positional argument / an output index) or by a str (a keyword
argument / an output key). Model code does not always pass arguments the way a config assumes (BERT's
layers get the mask positionally, Llama's by keyword), so arguments are resolved through the forward
signature: an int also finds the keyword of that parameter, a str also finds its positional slot.
Every tuner that reads or rewrites a module's arguments or output uses these helpers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

Position = int | str


class ArgumentSlot:
    """One parameter of ``module.forward``, addressed by SWIFT's int-or-str position.

    Args:
        module: the module whose ``forward`` is called.
        position: an int (positional index) or a str (parameter name).
    """

    def __init__(self, module: nn.Module, position: Position) -> None:
        params = forward_parameters(module)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.position = position
        if isinstance(position, int):
            self.index: int | None = position
            self.name = positional[position].name if 0 <= position < len(positional) else None
        else:
            self.name = position
            names = [p.name for p in positional]
            self.index = names.index(position) if position in names else None

    @staticmethod
    def problem(module: nn.Module, position: Position) -> str | None:
        """Why ``module.forward`` cannot receive an argument at ``position``, or None when it can."""
        params = forward_parameters(module)
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_args = any(p.kind == p.VAR_POSITIONAL for p in params)
        var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        if isinstance(position, bool) or not isinstance(position, (int, str)):
            return f"must be an int (positional argument) or a str (keyword argument), got {position!r}"
        if isinstance(position, int) and (position < 0 or (position >= len(positional) and not var_args)):
            return f"{position} is not a positional argument of {_forward_name(module, params)}"
        if isinstance(position, str) and position not in {p.name for p in params} and not var_kwargs:
            return f"{position!r} is not an argument of {_forward_name(module, params)}"
        return None

    def get(self, args: tuple, kwargs: dict):
        """The argument's value in this call, or None when the caller did not pass it."""
        if self.index is not None and self.index < len(args):
            return args[self.index]
        if self.name is not None:
            return kwargs.get(self.name)
        return None

    def replace(self, args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the argument set to ``value``, where the caller put it (else by keyword)."""
        if self.index is not None and self.index < len(args):
            return (*args[: self.index], value, *args[self.index + 1 :]), kwargs
        if self.name is None:
            raise ValueError(f"cannot pass a value at position {self.position!r}: the call has too few arguments")
        return args, {**kwargs, self.name: value}


def forward_parameters(module: nn.Module) -> tuple[inspect.Parameter, ...]:
    """The parameters of ``module.forward`` without ``self`` (cached per class: layers resolve them every call).

    Tuner wrappers forward ``*args, **kwargs`` unchanged, so the wrapped module's signature is the one that counts.
    """
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if "forward" in vars(module):
        return tuple(inspect.signature(module.forward).parameters.values())
    function = type(module).forward
    parameters = _PARAMETERS.get(function)
    if parameters is None:
        parameters = _PARAMETERS[function] = tuple(inspect.signature(function).parameters.values())[1:]
    return parameters


# unbound forward -> its parameters without ``self``; a plain dict rather than functools.cache, which torch.compile
# warns about when it traces a layer's forward
_PARAMETERS: dict = {}


def _forward_name(module: nn.Module, params: tuple[inspect.Parameter, ...]) -> str:
    return f"{type(module).__name__}.forward({', '.join(p.name for p in params)})"


def output_value(output, position: Position | None, field: str, module_name: str) -> torch.Tensor:
    """The tensor at ``position`` of a module output; a bare tensor output is used whole (as in SWIFT).

    Args:
        output: what the module returned: a tensor, a tuple/list, or a mapping such as ``ModelOutput``.
        position: an index, or a key of a mapping output (an index into its non-None values also works).
        field, module_name: ``Config.field`` and the module's name, for the error message.
    """
    if isinstance(output, torch.Tensor):
        return output
    key = _output_key(output, position, field, module_name)
    value = output[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{field}={position!r} selects a {type(value).__name__} in the output of {module_name}")
    return value


def replace_output_value(output, position: Position | None, value: torch.Tensor, field: str, module_name: str):
    """A module output with the tensor at ``position`` replaced by ``value`` (mappings are updated in place)."""
    if isinstance(output, torch.Tensor):
        return value
    key = _output_key(output, position, field, module_name)
    if isinstance(output, tuple):
        items = list(output)
        items[key] = value
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if isinstance(output, list):
        return [value if index == key else item for index, item in enumerate(output)]
    output[key] = value
    return output


def _output_key(output, position: Position | None, field: str, module_name: str):
    if isinstance(output, (tuple, list)):
        if isinstance(position, int) and not isinstance(position, bool) and -len(output) <= position < len(output):
            return position
        raise ValueError(
            f"{field}={position!r} does not exist in the output of {module_name}, a {type(output).__name__} of "
            f"{len(output)} items; use an index below {len(output)}"
        )
    if isinstance(output, Mapping):
        keys = [key for key, value in output.items() if value is not None]
        if isinstance(position, str) and position in keys:
            return position
        if isinstance(position, int) and not isinstance(position, bool) and -len(keys) <= position < len(keys):
            return keys[position]
        raise ValueError(
            f"{field}={position!r} does not exist in the output of {module_name}, a {type(output).__name__} "
            f"with keys {keys}"
        )
    raise ValueError(
        f"the output of {module_name} is a {type(output).__name__}; {field} needs a tensor, tuple or dict"
    )


def first_tensor(value: object) -> torch.Tensor:
    """The tensor that carries the hidden states: ``value`` itself, or the first element of a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    if isinstance(value, dict) and value:  # includes transformers' ModelOutput
        return first_tensor(next(iter(value.values())))
    raise TypeError(f"expected a tensor, or a tuple/list/dict starting with one, got {type(value).__name__}")


def first_argument(module: nn.Module, args: tuple, kwargs: dict) -> object:
    """The first argument of a call ``module(*args, **kwargs)``, passed by position or by keyword."""
    value = ArgumentSlot(module, 0).get(args, kwargs)
    if value is None:
        raise TypeError(f"{type(module).__name__} was called without a first argument")
    return value


def replace_first_tensor(output, tensor: torch.Tensor):
    """``output`` with its hidden states (itself, or its first element / value, recursively) replaced.

    The other elements are kept (blocks may return several values).

    Args:
        output: a tensor, a tuple/list, or a mapping such as ``ModelOutput``.
        tensor: the new hidden states.
    """
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, (tuple, list)):
        items = [replace_first_tensor(output[0], tensor), *output[1:]]
        return tuple(items) if isinstance(output, tuple) else items
    key = next(iter(output.keys()))
    copied = type(output)(**output) if hasattr(output, "to_tuple") else output.copy()
    copied[key] = tensor
    return copied
