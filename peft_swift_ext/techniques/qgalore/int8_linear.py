"""Linear layers whose weight is stored as INT8 codes (Q-GaLore's quantised weights), trainable by QGaLoreAdamW."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.paths import name_matches, parent_of
from ...core.unwrap import get_output_embeddings, unwrap_model
from .quantization import QuantizedTensor, dequantize, pick_group_size, quantize

#: Attribute of an INT8 weight parameter holding its float gradient (an integer tensor cannot have `.grad`).
FLOAT_GRAD = "float_grad"


class Int8WeightLinear(nn.Module):
    """An `nn.Linear` whose weight is kept as unsigned INT8 codes with a float32 scale and zero point per group.

    The weight takes `1 + 8 / group_size` bytes per value instead of 4 (float32). The forward pass dequantises
    the weight on the fly (`W = codes * scale + zero`) and computes `x Wᵀ + b`; the backward pass dequantises it
    again rather than keeping a float copy. An integer tensor cannot carry a float gradient, so the weight's
    gradient `∂loss/∂W` is accumulated in `weight.float_grad`, which `QGaLoreAdamW` reads, uses and clears.
    Updates are applied to the dequantised weight and rounded back to the INT8 grid with stochastic rounding
    (`apply_update_`), which is unbiased, so updates smaller than one quantisation step survive on average.

    Args:
        linear: the layer to convert; its weight is rounded to nearest once, its bias is kept as it is.
        group_size: values sharing one scale and zero point (reduced to a divisor of the weight's size).
    """

    def __init__(self, linear: nn.Linear, group_size: int = 256):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = pick_group_size(linear.weight.numel(), group_size)
        self.weight_dtype = linear.weight.dtype
        quantized = quantize(linear.weight, 8, self.group_size)
        self.weight = nn.Parameter(quantized.codes.view(linear.weight.shape), requires_grad=False)
        self.register_buffer("weight_scales", quantized.scales)
        self.register_buffer("weight_zeros", quantized.zeros)
        self.bias = linear.bias
        # The optimizer sees only the parameter: let it find the layer that owns the codes.
        self.weight.int8_layer = self
        # Makes autograd call the backward pass (and so fill float_grad) even when nothing else needs gradients.
        self._anchor = torch.zeros((), requires_grad=True)

    def quantized(self) -> QuantizedTensor:
        """The weight as a `QuantizedTensor` (sharing this layer's storage)."""
        return QuantizedTensor(
            self.weight.data.flatten(), self.weight_scales, self.weight_zeros, self.weight.shape, 8,
            self.group_size, self.weight_dtype,
        )  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the codes stand for.

        Args:
            dtype: dtype of the result; default the original weight's dtype.
        """
        return dequantize(self.quantized(), dtype or self.weight_dtype)

    @torch.no_grad()
    def apply_update_(self, delta: torch.Tensor, stochastic: bool = True) -> None:
        """Add `delta` to the dequantised weight and store the result as new INT8 codes, scales and zeros.

        Args:
            delta: the change of the weight, of its shape.
            stochastic: round stochastically (unbiased; what training uses) instead of to nearest.
        """
        weight = self.dequantized_weight(torch.float32).add_(delta.float())
        quantized = quantize(weight, 8, self.group_size, stochastic=stochastic)
        self.weight.data.copy_(quantized.codes.view(self.weight.shape))
        self.weight_scales.copy_(quantized.scales)
        self.weight_zeros.copy_(quantized.zeros)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs @ Wᵀ + bias` with the dequantised weight; the weight's gradient goes to `weight.float_grad`.

        Args:
            inputs: `(..., in_features)` activations.
        """
        anchor = self._anchor if torch.is_grad_enabled() and self.training else None
        return _Int8Linear.apply(inputs, self.bias, anchor, self)

    def extra_repr(self) -> str:
        """Sizes and group size, for `print(model)`."""
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, bias, anchor, layer):
        ctx.layer = layer
        ctx.save_for_backward(inputs)
        return F.linear(inputs, layer.dequantized_weight(inputs.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        layer = ctx.layer
        weight = layer.dequantized_weight(grad_output.dtype)
        grad_inputs = grad_output @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_output.reshape(-1, layer.out_features).t() @ inputs.reshape(-1, layer.in_features)
        held = getattr(layer.weight, FLOAT_GRAD, None)
        setattr(layer.weight, FLOAT_GRAD, grad_weight.float() if held is None else held.add_(grad_weight))
        grad_bias = grad_output.reshape(-1, layer.out_features).sum(0) if ctx.needs_input_grad[1] else None
        grad_anchor = torch.zeros((), dtype=torch.float32) if ctx.needs_input_grad[2] else None
        return grad_inputs, grad_bias, grad_anchor, None


def quantize_linear_weights(
    model: nn.Module, target_modules: str | list[str] | None = None, group_size: int = 256
) -> list[nn.Parameter]:
    """Replace the selected `nn.Linear` layers of `model` by `Int8WeightLinear`, in place.

    Returns the new INT8 weight parameters, to put in a `QGaLoreAdamW` group (with `rank` for Q-GaLore).

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`.
        target_modules: a regex matched in full against module names, or a list of names matched by suffix;
            None selects every `nn.Linear` except the output head.
        group_size: values per quantisation group.
    """
    base = unwrap_model(model)
    head = get_output_embeddings(base)
    chosen = [
        name
        for name, module in base.named_modules()
        if type(module) is nn.Linear and module is not head and name_matches(name, target_modules)
    ]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} selects no nn.Linear in {type(base).__name__}")
    weights = []
    for name in chosen:
        parent, child = parent_of(base, name)
        layer = Int8WeightLinear(getattr(parent, child), group_size)
        setattr(parent, child, layer)
        weights.append(layer.weight)
    return weights


def int8_layer_of(param: torch.Tensor) -> Int8WeightLinear | None:
    """The `Int8WeightLinear` whose codes `param` is, or None for an ordinary parameter.

    Args:
        param: any parameter.
    """
    return getattr(param, "int8_layer", None)
