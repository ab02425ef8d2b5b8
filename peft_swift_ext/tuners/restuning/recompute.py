"""The two-layer MLP of Res-Tuning's adapters, keeping only its input for backward.

Autograd would keep ``ln1(x)`` and ``GELU(ln1(x))`` besides ``x`` (which the bypass keeps anyway); those two are a
third of what the bypass keeps with ViT recipes. Here backward recomputes them from ``x`` (one more ``ln1`` and GELU,
not ``ln2``) under the forward's autocast state, so outputs and gradients are those of the plain MLP
(docs/tuners/restuning.md, "Measured"). While torch.compile traces, which it cannot do through
``torch.autograd.grad``, the same recomputation is activation checkpointing instead.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def _mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


class _RecomputedMLP(torch.autograd.Function):
    """``ln2(GELU(ln1(x)))`` that saves ``x`` and the weights, and reruns ``GELU(ln1(x))`` in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2, b2)
        device = x.device.type
        # backward runs outside the caller's autocast region (or in another): the recomputation must see the
        # forward's, on or off (devices without autocast, such as meta, have none to restore)
        ctx.autocast = None
        if torch.amp.is_autocast_available(device):
            ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return _mlp(x, w1, b1, w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        first = [None if t is None else t.detach().requires_grad_(need) for t, need in zip((x, w1, b1), needs)]
        autocast = torch.autocast(*ctx.autocast) if ctx.autocast else contextlib.nullcontext()  # device, dtype, on
        with torch.enable_grad(), autocast:
            hidden = F.gelu(F.linear(*first))
        grad_w2, grad_b2, grad_hidden = _linear_backward(grad, hidden.detach(), w2, b2, needs[3:])
        wanted = [t for t in first if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(hidden, wanted, grad_hidden) if wanted else ())
        grads_first = [next(grads) if t is not None and t.requires_grad else None for t in first]
        return (*grads_first, grad_w2, grad_b2)


def _linear_backward(grad, hidden, weight, bias, needs):
    """Gradients of ``F.linear(hidden, weight, bias)`` for weight, bias and input, without rerunning it.

    The same products and sums as autograd's backward of that call, in the dtype autocast ran it in (``hidden``'s),
    so the results are bit-identical: ``F.linear`` runs a contiguous input with a bias as one ``addmm`` on its rows
    (``hidden``, a GELU output, is contiguous), whose backward is these two ``mm`` and a sum over the rows.
    """
    rows = grad.reshape(-1, grad.shape[-1])
    flat = hidden.reshape(-1, hidden.shape[-1])
    grad_weight = rows.t().mm(flat).to(weight.dtype) if needs[0] else None
    grad_bias = rows.sum(0).to(bias.dtype) if bias is not None and needs[1] else None
    grad_input = rows.mm(weight.to(hidden.dtype)).view(hidden.shape)
    return grad_weight, grad_bias, grad_input


def adapter_mlp(x: torch.Tensor, ln1: nn.Linear, ln2: nn.Linear) -> torch.Tensor:
    """``ln2(GELU(ln1(x)))`` on the last dimension; in training, its hidden activations are recomputed in backward.

    Args:
        x: the input, in ``ln1``'s dtype, channels last.
        ln1: the first (down) projection.
        ln2: the second (up) projection.
    """
    params = (ln1.weight, ln1.bias, ln2.weight, ln2.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        if torch.compiler.is_compiling():
            # torch.compile cannot trace the torch.autograd.grad of _RecomputedMLP.backward (the graph would split
            # at every adapter); activation checkpointing states the same recomputation in a form it traces, and
            # the compiler schedules what backward reruns
            return checkpoint(_mlp, x, *params, use_reentrant=False)
        return _RecomputedMLP.apply(x, *params)
    return _mlp(x, *params)
