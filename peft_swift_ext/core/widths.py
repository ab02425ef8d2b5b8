"""Feature widths that can be read off a module without running it, for checks before injection."""

from __future__ import annotations

from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def feature_width(module: nn.Module, where: str) -> int | None:
    """Channels of the module's first input (``where="input"``) or of its output, or None when unknown.

    Known for linear, convolution, normalisation and embedding layers, for modules that store
    ``in_channels``/``out_channels`` themselves (diffusers' resnet, down/upsample and transformer blocks),
    and, for the output, for blocks ending in a list of ``resnets`` (diffusers' UNet blocks).
    """
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):  # a tuner layer: the wrapped module decides
        return feature_width(base, where)
    if isinstance(module, nn.Linear):
        return module.in_features if where == "input" else module.out_features
    if isinstance(module, _CONV):
        return module.in_channels if where == "input" else module.out_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, _BATCH_NORM):
        return module.num_features
    if isinstance(module, nn.Embedding):
        return None if where == "input" else module.embedding_dim
    # vars(): diffusers models forward unknown attributes to their config, which would mislead here
    stored = vars(module).get("in_channels" if where == "input" else "out_channels")
    if isinstance(stored, int) and not isinstance(stored, bool):
        return stored
    resnets = module._modules.get("resnets")
    if where == "output" and isinstance(resnets, nn.ModuleList) and len(resnets):
        return feature_width(resnets[-1], "output")
    return None
