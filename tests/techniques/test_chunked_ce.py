import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from technique_helpers import random_batch, tiny_llama

from peft_swift_ext.techniques.chunked_ce import (
    ChunkedLinearCrossEntropyLoss,
    causal_lm_chunked_loss,
    chunked_linear_cross_entropy,
)


def _inputs(tokens=37, hidden=16, vocab=50, with_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::5] = -100
    return h, w, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_gradients_equal_logits_then_cross_entropy(reduction, chunk_size, with_bias):
    h, w, b, labels = _inputs(with_bias=with_bias)
    reference = F.cross_entropy(F.linear(h, w, b), labels, reduction=reduction)
    chunked = chunked_linear_cross_entropy(h, w, labels, b, chunk_size=chunk_size, reduction=reduction)
    torch.testing.assert_close(chunked, reference)
    # A non-uniform upstream gradient checks the per-token scaling of the backward pass.
    upstream = torch.linspace(0.5, 2.0, reference.numel(), dtype=torch.float64).view_as(reference)
    for got, want in zip(
        _grads((chunked * upstream).sum(), (h, w, b)), _grads((reference * upstream).sum(), (h, w, b))
    ):
        torch.testing.assert_close(got, want)


def test_gradcheck():
    h, w, b, labels = _inputs(tokens=6, hidden=3, vocab=5)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_linear_cross_entropy(h, w, labels, b, chunk_size=4), (h, w, b)
    )


def test_batched_shapes_and_the_module_form():
    h, w, _, labels = _inputs(tokens=24)
    loss = ChunkedLinearCrossEntropyLoss(chunk_size=5, reduction="none")(h.view(2, 12, -1), w, labels.view(2, 12))
    assert loss.shape == (2, 12)
    torch.testing.assert_close(loss.flatten(), F.cross_entropy(h @ w.t(), labels, reduction="none"))


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
    h, w, _, labels = _inputs()
    loss = chunked_linear_cross_entropy(h, w, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "avg"}, "reduction must be"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.zeros(3)}, "do not match"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    h, w, _, labels = _inputs()
    kwargs = {"labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunked_linear_cross_entropy(h, w, **kwargs)


@pytest.mark.parametrize("wrap", [False, True])
def test_causal_lm_loss_equals_transformers(wrap):
    model = tiny_llama()
    if wrap:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    batch = random_batch()
    batch["labels"][:, :3] = -100
    reference = model(**batch).loss
    reference_grads = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])
    chunked = causal_lm_chunked_loss(model, batch["input_ids"], batch["labels"], chunk_size=5)
    grads = torch.autograd.grad(chunked, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_logit_softcapping_models_are_refused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_chunked_loss(model, **random_batch())
