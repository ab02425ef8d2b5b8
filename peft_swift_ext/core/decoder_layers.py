"""Finding a model's stacks of repeated blocks (decoder layers, encoder layers), one way for every user.

LISA samples decoder layers, LLaMA-PRO expands them and FSDP wraps each block as a unit; all three look for
the same thing: an ``nn.ModuleList`` of two or more blocks of one class. A block wrapped by a tuner layer
(Prompt, LLaMA-PRO) counts as the class it wraps.
"""

from __future__ import annotations

from collections.abc import Callable

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def block_class(module: nn.Module) -> type:
    """The class of a block (an entry of a layer list), seen through tuner layers that wrap it."""
    return type(module.get_base_layer()) if isinstance(module, BaseTunerLayer) else type(module)


def repeated_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """``(path, list)`` of every ``nn.ModuleList`` of two or more blocks of one class, in model order."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({block_class(m) for m in module}) == 1
    ]


def find_decoder_layers(
    model: nn.Module,
    layers_path: str | None = None,
    accept: Callable[[nn.ModuleList], bool] | None = None,
    field: str = "layers_path",
    accept_description: str = "that fits",
) -> tuple[str, nn.ModuleList]:
    """``(path, list)`` of the model's decoder layers: ``layers_path`` if given, else the largest repeated list.

    "Largest" counts parameters, which picks a language model's layers over a vision tower's or a head's.

    Args:
        model: a plain model.
        layers_path: dotted path of the list, overriding the search.
        accept: a further condition a found list must meet (e.g. LLaMA-PRO's output projections).
        field: the config field named in errors (``"LisaConfig.layers_path"``...).
        accept_description: what ``accept`` asks for, for the error message.

    Raises:
        ValueError: naming ``field`` when the path is not a non-empty ``nn.ModuleList``, or nothing fits.
    """
    if layers_path is not None:
        try:
            layers = model.get_submodule(layers_path)
        except AttributeError:
            raise ValueError(f"{field}={layers_path!r} is not a module of {type(model).__name__}") from None
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ValueError(
                f"{field}={layers_path!r} is a {type(layers).__name__}, not a non-empty nn.ModuleList of layers"
            )
        return layers_path, layers
    candidates = [(path, layers) for path, layers in repeated_block_lists(model) if accept is None or accept(layers)]
    if not candidates:
        raise ValueError(
            f"{field} is None and {type(model).__name__} has no nn.ModuleList of repeated blocks"
            + (f" {accept_description}" if accept is not None else "")
            + f"; set {field.rpartition('.')[2]} to the module path of the decoder layers"
        )
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
