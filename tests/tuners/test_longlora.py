"""LongLoRA: S²-Attn against an explicit per-group reference, eval = full attention, training parts, switching."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from peft_swift_ext import LongLoraConfig, Swift
from peft_swift_ext.tuners.longlora.attention import shifted_sparse_attention

from ..helpers import state_hash
from ..tiny_models import llama_inputs, tiny_llama

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def reference_s2(query, key, value, group, allowed=None):
    """Per head and per group, softmax attention over the group's tokens, written as plain loops.

    Heads in the first half use groups [0, g), [g, 2g), ...; the others groups shifted by g // 2 over the length
    padded to a multiple of g (the last one wrapping round). Inside a group a query attends to the keys at its own
    or earlier original positions that ``allowed`` (B, L, L) permits.
    """
    batch, heads, length, dim = query.shape
    per_kv = heads // key.shape[1]
    padded = math.ceil(length / group) * group
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            shift = group // 2 if h >= heads // 2 else 0
            for start in range(0, padded, group):
                members = [(start + i + shift) % padded for i in range(group)]
                members = [p for p in members if p < length]
                for t in members:
                    keys = [s for s in members if s <= t and (allowed is None or allowed[b, t, s])]
                    if not keys:
                        continue
                    k = key[b, h // per_kv, keys].double()
                    weights = torch.softmax(k @ query[b, h, t].double() / math.sqrt(dim), dim=0)
                    out[b, t, h] = weights @ value[b, h // per_kv, keys].double()
    return out.float()


class FakeAttention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("inner", [sdpa_attention_forward, eager_attention_forward], ids=["sdpa", "eager"])
@pytest.mark.parametrize(
    ("kv_heads", "length", "group"), [(2, 16, 4), (2, 14, 4), (1, 12, 6), (4, 9, 9)], ids=["gqa", "pad", "mqa", "one"]
)
def test_s2_attention_equals_explicit_per_group_attention(inner, kv_heads, length, group):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, length, 8, generator=generator)
    key, value = (torch.randn(2, kv_heads, length, 8, generator=generator) for _ in range(2))
    module = FakeAttention(4 // kv_heads).train()
    out, _ = shifted_sparse_attention(inner, module, query, key, value, None, group, scaling=8**-0.5, dropout=0.0)
    torch.testing.assert_close(out, reference_s2(query, key, value, group), atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", [sdpa_attention_forward, eager_attention_forward], ids=["sdpa", "eager"])
def test_s2_attention_respects_padding(inner):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 4, 12, 8, generator=generator) for _ in range(3))
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[0, :3] = False
    allowed = padding[:, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()
    mask = allowed[:, None] if inner is sdpa_attention_forward else torch.where(allowed[:, None], 0.0, -3.4e38)
    out, _ = shifted_sparse_attention(inner, FakeAttention(1).train(), query, key, value, mask, 4, scaling=8**-0.5)
    expected = reference_s2(query, key, value, 4, allowed)
    torch.testing.assert_close(out[0, 3:], expected[0, 3:], atol=1e-5, rtol=0)  # padded queries are don't-care
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=0)


def reference_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    group = int(query.shape[2] * 0.25)
    if not module.training or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return reference_s2(query, key, value, group), None


AttentionInterface.register("s2_reference", reference_attention)
AttentionMaskInterface.register("s2_reference", sdpa_mask)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_model_trains_with_s2_and_evaluates_with_full_attention(implementation):
    inputs = llama_inputs(length=16)
    model = get_peft_model(tiny_llama(attn_implementation=implementation), LongLoraConfig(**LORA))
    full = get_peft_model(tiny_llama(attn_implementation=implementation), LoraConfig(**LORA))
    reference = get_peft_model(tiny_llama(attn_implementation="s2_reference"), LoraConfig(**LORA))
    for model_ in (full, reference):
        model_.load_state_dict(model.state_dict(), strict=False)
    model.eval(), full.eval()
    torch.testing.assert_close(model(**inputs).logits, full(**inputs).logits, atol=0, rtol=0)
    model.train(), reference.train()
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)


def test_lora_embeddings_and_norms_train_and_save(tmp_path):
    inputs = llama_inputs()
    model = get_peft_model(tiny_llama(), LongLoraConfig(**LORA))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert {n.split(".modules_to_save.")[0] for n in trainable if ".modules_to_save." in n} == {
        "base_model.model.model.embed_tokens",
        "base_model.model.model.norm",
        *(
            f"base_model.model.model.layers.{i}.{n}"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1)
    model.eval()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
    merged = loaded.merge_and_unload()
    assert merged.config._attn_implementation == "sdpa"
    torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_deactivate_and_delete_restore_full_attention():
    inputs = llama_inputs(length=16)
    base = tiny_llama().train()(**inputs).logits
    model = Swift.prepare_model(tiny_llama(), {"long": LongLoraConfig(**LORA)}).train()
    shifted = model(**inputs).logits
    model.deactivate_adapter("long")
    torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)
    model.activate_adapter("long")
    torch.testing.assert_close(model(**inputs).logits, shifted, atol=0, rtol=0)
    model.delete_adapter("long")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(**inputs).logits, base, atol=1e-6, rtol=0)


def test_unsupported_attention_or_tiny_groups_are_clear_errors():
    model = tiny_llama(attn_implementation="flex_attention")
    before = state_hash(model)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        get_peft_model(model, LongLoraConfig(**LORA))
    assert state_hash(model) == before and model.config._attn_implementation == "flex_attention"
    with pytest.raises(ValueError, match="LongLoraConfig.group_size_ratio"):
        LongLoraConfig(group_size_ratio=0)
    tuned = get_peft_model(tiny_llama(), LongLoraConfig(**LORA)).train()
    with pytest.raises(ValueError, match="groups of 1 token"):
        tuned(**llama_inputs(length=4))
