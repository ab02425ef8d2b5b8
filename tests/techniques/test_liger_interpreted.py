"""Liger kernels on CPU through Triton's interpreter; launched by test_liger.py with TRITON_INTERPRET=1."""

import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from technique_helpers import random_batch, tiny_llama
from transformers.models.llama import modeling_llama

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.fixture
def patch_later():
    """Applies liger through this fixture so that every patch is undone even when a test fails."""
    from peft_swift_ext.techniques.liger import apply_liger_kernel

    patches = []

    def apply(model, **options):
        patches.append(apply_liger_kernel(model, **options))
        return patches[-1]

    yield apply
    for patch in patches:
        patch.undo()


def _loss_and_grads(model, batch):
    loss = model(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "options",
    [{"fused_linear_cross_entropy": True}, {"cross_entropy": True, "fused_linear_cross_entropy": False}],
    ids=["fused_linear_ce+rope", "ce+rope"],
)
def test_loss_and_gradients_equal_eager_transformers(patch_later, options):
    model, batch = tiny_llama(), random_batch()
    reference_loss, reference_grads = _loss_and_grads(model, batch)
    patch_later(model, rope=True, **options)
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=0)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_undo_restores_transformers_torch_and_the_model(patch_later):
    model = tiny_llama()
    originals = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, F.cross_entropy)
    instance = dict(vars(model))
    with patch_later(model, rope=True, cross_entropy=True, fused_linear_cross_entropy=False):
        assert F.cross_entropy is not originals[2] and modeling_llama.apply_rotary_pos_emb is not originals[0]
    assert (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, F.cross_entropy) == originals
    assert dict(vars(model)) == instance


def test_peft_model_is_unwrapped(patch_later):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    batch = random_batch()
    reference = model(**batch).loss.detach()
    patch = patch_later(model)
    assert patch.model is model.get_base_model()
    torch.testing.assert_close(model(**batch).loss.detach(), reference, atol=1e-5, rtol=0)


def test_kernels_that_fail_under_the_interpreter_are_refused(patch_later):
    with pytest.raises(ValueError, match=r"\['rms_norm'\] do not run under TRITON_INTERPRET=1"):
        patch_later(tiny_llama(), rms_norm=True)
