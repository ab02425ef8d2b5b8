"""The two-layer MLP of Res-Tuning's adapters, keeping only its input for backward.

``ln2(GELU(ln1(x)))`` computed by autograd keeps three tensors for backward: ``x`` (for ln1's weight gradient),
``ln1(x)`` (for the GELU's) and ``GELU(ln1(x))`` (for ln2's). In the bypass, ``x`` is a backbone feature or the
bypass state, which backward needs anyway; the two hidden tensors are extra, ``2 * adapter_length`` channels per
token for each of the bypass's ``2 * depth`` adapters (a third of what the bypass keeps with ViT recipes). Here they
are recomputed from ``x`` in backward instead, with the same operations under the same autocast state, so outputs
and gradients are those of the plain MLP. The cost is one more ``ln1`` and GELU per adapter in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


class _RecomputedMLP(torch.autograd.Function):
    """``ln2(GELU(ln1(x)))`` that saves ``x`` and the weights, and reruns the MLP in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2, b2)
        device = x.device.type
        # backward runs outside the caller's autocast region: the recomputation must see the forward's
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return _mlp(x, w1, b1, w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inputs = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)
        ]
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            out = _mlp(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def adapter_mlp(x: torch.Tensor, ln1: nn.Linear, ln2: nn.Linear) -> torch.Tensor:
    """``ln2(GELU(ln1(x)))`` on the last dimension; in training, its hidden activations are recomputed in backward.

    Args:
        x: the input, in ``ln1``'s dtype, channels last.
        ln1: the first (down) projection.
        ln2: the second (up) projection.
    """
    params = (ln1.weight, ln1.bias, ln2.weight, ln2.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return _RecomputedMLP.apply(x, *params)
    return _mlp(x, *params)
