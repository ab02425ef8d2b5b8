"""Linear layer + cross-entropy that never holds the full logits, in plain torch (CPU or any GPU).

The forward pass keeps only each token's log-sum-exp, `chunk_size` tokens at a time; the backward pass recomputes
the chunk's logits to form the gradient (see docs/techniques/chunked_ce.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.unwrap import unwrap_model


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, reduction):
        valid = labels != ignore_index
        safe_labels = labels.masked_fill(~valid, 0)
        # Low-precision inputs are accumulated in float32, as transformers upcasts logits before its loss.
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        log_sum_exp = torch.empty(hidden.shape[0], dtype=compute_dtype, device=hidden.device)
        target_logit = torch.empty_like(log_sum_exp)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight, bias).to(compute_dtype)
            log_sum_exp[rows] = torch.logsumexp(logits, dim=-1)
            target_logit[rows] = logits.gather(1, safe_labels[rows, None]).squeeze(1)
        losses = (log_sum_exp - target_logit) * valid
        ctx.save_for_backward(hidden, weight, bias, safe_labels, valid, log_sum_exp)
        ctx.chunk_size, ctx.reduction = chunk_size, reduction
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / valid.sum().clamp(min=1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, labels, valid, log_sum_exp = ctx.saved_tensors
        compute_dtype = log_sum_exp.dtype
        grad_output = grad_output.to(compute_dtype)
        # d loss_i / d logits_i = softmax_i - onehot(label_i), scaled by each token's share of the output.
        token_scale = valid * (grad_output / valid.sum().clamp(min=1) if ctx.reduction == "mean" else grad_output)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=compute_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=compute_dtype) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            grad_logits = F.linear(hidden[rows], weight, bias).to(compute_dtype)
            grad_logits.sub_(log_sum_exp[rows, None]).exp_()
            grad_logits.scatter_add_(1, labels[rows, None], torch.full_like(log_sum_exp[rows, None], -1.0))
            grad_logits.mul_(token_scale[rows, None])
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.to(compute_dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].to(compute_dtype))
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias), labels)` without materialising the logits.

    Args:
        hidden: `(..., hidden_size)` inputs of the output layer.
        weight: `(vocab_size, hidden_size)` output-layer weight.
        labels: class indices with the shape of `hidden` minus its last dimension; `ignore_index` is skipped.
        bias: optional `(vocab_size,)` bias.
        chunk_size: tokens whose logits exist at once; smaller saves memory, larger runs fewer matmuls.
        ignore_index: label value that contributes no loss.
        reduction: `'mean'` over non-ignored tokens, `'sum'` or `'none'` (per token).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match hidden of shape {tuple(hidden.shape)}")
    batch_shape = labels.shape
    losses = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), chunk_size, ignore_index, reduction
    )
    return losses.view(batch_shape) if reduction == "none" else losses


class ChunkedLinearCrossEntropyLoss(nn.Module):
    """Module form of `chunked_linear_cross_entropy`; called as `loss(hidden, weight, labels, bias=None)`.

    Args:
        chunk_size: tokens whose logits exist at once.
        ignore_index: label value that contributes no loss.
        reduction: `'mean'` over non-ignored tokens, `'sum'` or `'none'`.
    """

    def __init__(self, chunk_size: int = 1024, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.chunk_size, self.ignore_index, self.reduction = chunk_size, ignore_index, reduction

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of `F.linear(hidden, weight, bias)` against `labels`; see `chunked_linear_cross_entropy`.

        Args:
            hidden: `(..., hidden_size)` inputs of the output layer.
            weight: `(vocab_size, hidden_size)` output-layer weight.
            labels: class indices, shaped like `hidden` without its last dimension.
            bias: optional `(vocab_size,)` bias.
        """
        return chunked_linear_cross_entropy(
            hidden, weight, labels, bias, self.chunk_size, self.ignore_index, self.reduction
        )


def causal_lm_chunked_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    **model_kwargs,
) -> torch.Tensor:
    """Next-token loss of a causal LM, equal to `model(..., labels=labels).loss`, without building logits.

    Runs the model's backbone, shifts the labels as transformers does, and applies the chunked loss to the
    output layer. Works for plain, PEFT and SWIFT-wrapped models whose head is a plain `nn.Linear`.

    Args:
        model: a `*ForCausalLM` model or a wrapper of one.
        input_ids: the token ids of the batch.
        labels: the target ids, *not* shifted yet (as for `model(..., labels=labels)`).
        attention_mask: the usual padding mask, if any.
        chunk_size: tokens per chunk of the loss (see `chunked_linear_cross_entropy`).
        ignore_index: label value that contributes no loss.
        **model_kwargs (Any): passed on to the backbone (e.g. `position_ids`).
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"the output layer is a {type(head).__name__}; the chunked loss needs a plain nn.Linear")
    for option in ("final_logit_softcapping", "logit_scale"):
        if getattr(base.config, option, None) not in (None, 1.0):
            raise ValueError(f"{type(base).__name__} transforms its logits ({option}); the chunked loss does not")
    # Adapters such as LoRA are injected into the backbone in place, so the plain decoder still runs them.
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)[0]
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_linear_cross_entropy(hidden, head.weight, shifted, head.bias, chunk_size, ignore_index)
