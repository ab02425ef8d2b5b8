"""Adapter mechanics: the bottleneck math, where it applies, training, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_swift_ext import AdapterConfig, Swift

from ..helpers import randomize_adapter, state_hash
from ..tiny_models import bert_inputs, tiny_bert


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 4)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class PairOutput(nn.Module):
    """Returns ``(hidden, aux)``, like older transformers layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x), x.sum(-1)


class PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = PairOutput()

    def forward(self, x):
        return self.block(x)


def by_hand(layer, name: str, h: torch.Tensor, act=F.gelu) -> torch.Tensor:
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return h + act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


def test_adapter_output_is_residual_bottleneck_computed_by_hand():
    model = get_peft_model(TwoLinears(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=3))
    randomize_adapter(model, "default", seed=0, scale=0.3)
    x = torch.randn(5, 8)
    plain = TwoLinears()
    layer = model.base_model.model.first
    expected = plain.second(torch.tanh(by_hand(layer, "default", plain.first(x))))
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_act_layer_selects_the_activation():
    model = get_peft_model(
        TwoLinears(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=3, act_layer="relu")
    )
    layer = model.base_model.model.first
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), by_hand(layer, "default", TwoLinears().first(x), act=F.relu))


def test_hidden_pos_selects_one_element_of_a_tuple_output():
    model = get_peft_model(PairModel(), AdapterConfig(dim=8, target_modules=["block"], hidden_pos=0, adapter_length=4))
    x = torch.randn(3, 8)
    hidden, aux = model(x)
    plain_hidden, plain_aux = PairModel()(x)
    torch.testing.assert_close(hidden, by_hand(model.base_model.model.block, "default", plain_hidden))
    torch.testing.assert_close(aux, plain_aux, atol=0, rtol=0)


def test_hidden_pos_key_selects_a_model_output_field():
    config = AdapterConfig(dim=32, target_modules="encoder", hidden_pos="last_hidden_state", adapter_length=4)
    model = get_peft_model(tiny_bert(), config)
    inputs = bert_inputs()
    with torch.no_grad():
        expected = by_hand(model.base_model.model.encoder, "default", tiny_bert()(**inputs).last_hidden_state)
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_method_name_adapts_what_that_method_returns_and_leaves_no_patch_behind():
    # transformers 5's BertLayer returns feed_forward_chunk's result, so the reference is the plain layer output
    config = AdapterConfig(dim=32, target_modules=r".*layer\.\d+$", method_name="feed_forward_chunk", adapter_length=4)
    model = get_peft_model(tiny_bert(), config)
    wrapper = model.base_model.model.encoder.layer[0]
    plain = tiny_bert().encoder.layer[0]
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(hidden), by_hand(wrapper, "default", plain(hidden)), atol=1e-5, rtol=0)
    assert "feed_forward_chunk" not in vars(wrapper.base_layer)


def test_inactive_adapter_is_the_identity():
    model = get_peft_model(TwoLinears(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=3))
    x = torch.randn(5, 8)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), TwoLinears()(x), atol=0, rtol=0)


def test_half_precision_base_keeps_float32_adapter_and_returns_base_dtype():
    model = get_peft_model(TwoLinears().half(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=3))
    layer = model.base_model.model.first
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 8).half())
    assert out.dtype == torch.float16


def test_training_changes_only_adapter_weights_and_lowers_the_loss():
    model = get_peft_model(TwoLinears(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down.default." in n or ".adapter_up.default." in n for n in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    x, target = torch.randn(32, 8), torch.randn(32, 4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_merge_is_refused_naming_the_tuner_and_unload_restores_the_base():
    model = get_peft_model(TwoLinears(), AdapterConfig(dim=8, target_modules=["first"], adapter_length=3))
    with pytest.raises(ValueError, match="Adapter adapters cannot be merged"):
        model.merge_and_unload()
    x = torch.randn(4, 8)
    unloaded = model.unload()
    assert type(unloaded.first) is nn.Linear
    torch.testing.assert_close(unloaded(x), TwoLinears()(x), atol=0, rtol=0)


# --- refusals: clear errors, raised before the model changes ---------------------------------------------------


def refused(model: nn.Module, config: AdapterConfig, match: str) -> None:
    before = state_hash(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert state_hash(model) == before


def test_wrong_dim_for_a_linear_target_is_refused_before_injection():
    refused(TwoLinears(), AdapterConfig(dim=16, target_modules=["first"]), r"AdapterConfig.dim=16 does not fit first")


def test_module_list_target_is_refused_before_injection():
    refused(tiny_bert(), AdapterConfig(dim=32, target_modules=r"encoder\.layer"), "a ModuleList")


def test_unknown_method_name_is_refused_before_injection():
    config = AdapterConfig(dim=8, target_modules=["first"], method_name="no_such_method")
    refused(TwoLinears(), config, "AdapterConfig.method_name='no_such_method'")


def test_unknown_activation_is_refused_by_the_config():
    with pytest.raises(ValueError, match="AdapterConfig.act_layer='swishy' is unknown"):
        AdapterConfig(dim=8, target_modules=["first"], act_layer="swishy")


def test_wrong_dim_inside_a_block_is_reported_at_the_first_forward_without_changing_weights():
    model = get_peft_model(tiny_bert(), AdapterConfig(dim=16, target_modules=r"encoder\.layer\.\d+\.output"))
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"AdapterConfig.dim=16 does not fit encoder.layer.0.output"):
        model(**bert_inputs())
    assert state_hash(model) == before


def test_hidden_pos_missing_from_the_output_names_the_field_and_module():
    model = get_peft_model(PairModel(), AdapterConfig(dim=8, target_modules=["block"], hidden_pos=5))
    with pytest.raises(ValueError, match=r"AdapterConfig.hidden_pos=5 does not exist in the output of block"):
        model(torch.randn(2, 8))


def test_swift_prepare_model_accepts_the_adapter():
    model = Swift.prepare_model(TwoLinears(), {"a": AdapterConfig(dim=8, target_modules=["first"], adapter_length=3)})
    x = torch.randn(3, 8)
    layer = model.base_model.first
    plain = TwoLinears()
    torch.testing.assert_close(model(x), plain.second(torch.tanh(by_hand(layer, "a", plain.first(x)))))
