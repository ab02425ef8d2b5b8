"""Prompt / VPT mechanics: where the tokens go in each layer, masks, rotary tables, training, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_swift_ext import PromptConfig, Swift
from peft_swift_ext.tuners.prompt.layer import extend_attention_mask

from ..helpers import state_hash
from ..tiny_models import bert_inputs, llama_inputs, tiny_bert, tiny_llama, tiny_vit, vit_inputs


class ToyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden, mask=None):
        return self.proj(hidden) if mask is None else self.proj(hidden) * mask.sum(-1)[:, None, None]


class ToyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(ToyLayer() for _ in range(3))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def toy_config(**overrides) -> PromptConfig:
    options = {"dim": 4, "target_modules": r"layers\.\d+", "embedding_pos": 0, "prompt_length": 2}
    return PromptConfig(**{**options, **overrides})


def tokens(model, adapter: str = "default") -> list[torch.Tensor]:
    root = model.base_model.model if hasattr(model.base_model, "model") else model.base_model
    return [layer.prompt_token[adapter].expand(3, -1, -1) for layer in root.layers]


X = torch.randn(3, 5, 4)


def test_first_layer_concatenates_and_deeper_layers_replace_the_prompt_positions():
    model = get_peft_model(ToyEncoder(), toy_config())
    p0, p1, p2 = tokens(model)
    plain = ToyEncoder().layers
    out0 = plain[0](torch.cat((p0, X), 1))
    out1 = plain[1](torch.cat((p1, out0[:, 2:]), 1))
    expected = plain[2](torch.cat((p2, out1[:, 2:]), 1))
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_attach_back_puts_tokens_after_the_sequence_and_replaces_them_there():
    model = get_peft_model(ToyEncoder(), toy_config(attach_front=False))
    p0, p1, p2 = tokens(model)
    plain = ToyEncoder().layers
    out0 = plain[0](torch.cat((X, p0), 1))
    out1 = plain[1](torch.cat((out0[:, :-2], p1), 1))
    expected = plain[2](torch.cat((out1[:, :-2], p2), 1))
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_shallow_prompt_only_concatenates_in_its_single_layer():
    model = get_peft_model(ToyEncoder(), toy_config(target_modules=r"layers\.0"))
    (p0,) = [model.base_model.model.layers[0].prompt_token["default"].expand(3, -1, -1)]
    plain = ToyEncoder()
    expected = plain.layers[2](plain.layers[1](plain.layers[0](torch.cat((p0, X), 1))))
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_extract_embedding_removes_the_tokens_after_the_last_targeted_layer():
    model = get_peft_model(ToyEncoder(), toy_config(extract_embedding=True))
    p0, p1, p2 = tokens(model)
    plain = ToyEncoder().layers
    out1 = plain[1](torch.cat((p1, plain[0](torch.cat((p0, X), 1))[:, 2:]), 1))
    expected = plain[2](torch.cat((p2, out1[:, 2:]), 1))[:, 2:]
    assert model(X).shape == X.shape
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_dim_list_gives_each_layer_its_own_size():
    model = get_peft_model(ToyEncoder(), toy_config(dim=[4, 4, 4], prompt_length=3))
    assert [layer.prompt_token["default"].shape for layer in model.base_model.model.layers] == [(1, 3, 4)] * 3


def test_numeric_attention_mask_is_extended_with_attention_mask_value():
    model = get_peft_model(ToyEncoder(), toy_config(attention_mask_pos=1, attention_mask_value=0.5))
    seen = []
    model.base_model.model.layers[0].base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    mask = torch.ones(3, 5)
    model(X, mask)
    torch.testing.assert_close(seen[0], torch.cat((torch.full((3, 2), 0.5), mask), 1), atol=0, rtol=0)


def test_square_boolean_mask_gets_attendable_prompt_columns_and_neighbour_rows():
    mask = torch.tensor([[True, False], [True, True]]).expand(1, 1, 2, 2)
    extended = extend_attention_mask(mask, 4, front=True, value=0.0)
    expected = torch.tensor(
        [[True, True, True, False], [True, True, True, False], [True, True, True, False], [True, True, True, True]]
    )
    assert torch.equal(extended[0, 0], expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean / additive float 4-D masks
def test_padded_bert_positions_stay_masked_with_prompts(attention):
    config = PromptConfig(
        dim=32, target_modules=r"encoder\.layer\.\d+", embedding_pos=0, attention_mask_pos=1, prompt_length=3
    )
    base = tiny_bert()
    base.set_attn_implementation(attention)
    model = get_peft_model(base, config)
    inputs = bert_inputs()  # sample 0 has its last three positions padded
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, -3:] = (changed["input_ids"][0, -3:] + 1) % 128
    with torch.no_grad():
        original, perturbed = model(**inputs).last_hidden_state, model(**changed).last_hidden_state
    torch.testing.assert_close(perturbed[0, : 3 + 7], original[0, : 3 + 7], atol=1e-5, rtol=0)
    assert (perturbed[0, -3:] - original[0, -3:]).abs().max() > 1e-3


def test_llama_rotary_table_gives_prompt_tokens_the_first_position():
    config = PromptConfig(
        dim=32,
        target_modules=r"model\.layers\.\d+",
        embedding_pos=0,
        position_embeddings_pos="position_embeddings",
        prompt_length=3,
        extract_embedding=True,
    )
    model = get_peft_model(tiny_llama(), config)
    seen = []
    base_layer = model.base_model.model.model.layers[0].base_layer
    base_layer.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"]), with_kwargs=True)
    plain = tiny_llama()
    original = []
    plain.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: original.append(k["position_embeddings"]), with_kwargs=True
    )
    inputs = llama_inputs()
    with torch.no_grad():
        out = model(**inputs).logits
        plain(**inputs)
    assert out.shape == (2, 12, 128)
    for extended, table in zip(seen[0], original[0]):
        torch.testing.assert_close(extended[:, 3:], table, atol=0, rtol=0)
        torch.testing.assert_close(extended[:, :3], table[:, :1].expand(-1, 3, -1), atol=0, rtol=0)


def test_two_active_adapters_stack_with_the_first_nearest_the_sequence():
    model = Swift.prepare_model(ToyEncoder(), {"a": toy_config(), "b": toy_config(prompt_length=3)})
    a, b = tokens(model, "a"), tokens(model, "b")
    plain = ToyEncoder().layers
    out0 = plain[0](torch.cat((b[0], a[0], X), 1))
    out1 = plain[1](torch.cat((b[1], a[1], out0[:, 5:]), 1))
    expected = plain[2](torch.cat((b[2], a[2], out1[:, 5:]), 1))
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_active_adapters_in_different_roles_in_one_layer_are_refused():
    model = Swift.prepare_model(ToyEncoder(), {"a": toy_config(), "b": toy_config(target_modules=r"layers\.[12]")})
    with pytest.raises(ValueError, match=r"prompt adapters \[.a., .b.\] are active together in layers.1"):
        model(X)


def test_vpt_training_changes_only_prompt_tokens_and_lowers_the_loss():
    config = PromptConfig(dim=32, target_modules=r"layers\.\d+", embedding_pos=0, prompt_length=4)
    model = get_peft_model(tiny_vit(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".prompt_token.default" in name for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    inputs = vit_inputs()
    target = torch.randn(2, 32)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = F.mse_loss(model(**inputs).last_hidden_state[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_merge_is_refused_naming_the_tuner_and_unload_restores_the_base():
    model = get_peft_model(ToyEncoder(), toy_config())
    with pytest.raises(ValueError, match="Prompt adapters cannot be merged"):
        model.merge_and_unload()
    torch.testing.assert_close(model.unload()(X), ToyEncoder()(X), atol=0, rtol=0)


# --- refusals: clear errors, raised before the model changes ---------------------------------------------------


def refused(model: nn.Module, config: PromptConfig, match: str) -> None:
    before = state_hash(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert state_hash(model) == before


def test_embedding_pos_that_is_not_an_argument_is_refused_before_injection():
    refused(
        ToyEncoder(), toy_config(embedding_pos="hidden_states"), r"PromptConfig.embedding_pos does not fit layers.0"
    )


def test_attention_mask_pos_beyond_the_arguments_is_refused_before_injection():
    refused(ToyEncoder(), toy_config(attention_mask_pos=4), r"PromptConfig.attention_mask_pos does not fit layers.0")


def test_dim_list_of_the_wrong_length_is_refused_before_injection():
    refused(ToyEncoder(), toy_config(dim=[4, 4]), r"PromptConfig.dim lists 2 sizes but target_modules selects 3")


def test_module_list_target_is_refused_before_injection():
    refused(ToyEncoder(), toy_config(target_modules="layers"), "a ModuleList")


def test_wrong_dim_is_reported_at_the_first_forward_without_changing_weights():
    model = get_peft_model(ToyEncoder(), toy_config(dim=6))
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"PromptConfig.dim=6 does not fit layers.0"):
        model(X)
    assert state_hash(model) == before


def test_missing_embedding_pos_is_refused_by_the_config():
    with pytest.raises(ValueError, match="PromptConfig.embedding_pos must be set"):
        PromptConfig(dim=4, target_modules="layers")
