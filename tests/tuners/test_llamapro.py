"""LLaMA-PRO: identity at init (forward and cached generation), exact trainable set, checkpoints, merge, errors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from peft_swift_ext import LlamaProConfig, Swift
from peft_swift_ext.conversion import state_dict_from_swift
from peft_swift_ext.tuners.llamapro.layer import LlamaProLayer

from ..helpers import randomize_adapter, state_hash
from ..tiny_models import llama_inputs, tiny_bert, tiny_llama


def tiny_qwen2(num_layers: int = 4):
    """A model with per-layer ``layer_types`` (full and sliding attention), so the cache layout matters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=4,
        max_window_layers=num_layers // 2,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def plainly_expanded(make_model, tuned: PeftModel, group_ends: list[int]):
    """A fresh transformers model with the expanded layer count, its weights copied layer by layer from ``tuned``."""
    base = make_model()
    config = base.config.__class__.from_dict(base.config.to_dict())
    sources = []  # (module to copy from) in expanded order
    layers = tuned.base_model.model.model.layers
    for index, layer in enumerate(layers):
        sources.append(layer.base_layer if isinstance(layer, LlamaProLayer) else layer)
        if index in group_ends:
            sources.extend(layer.llamapro_blocks["default"])
    config.num_hidden_layers = len(sources)
    if getattr(config, "layer_types", None):
        original = base.config.layer_types
        config.layer_types = [t for i, t in enumerate(original) for _ in range(1 + (i in group_ends))]
    expanded = type(base)(config).eval()
    expanded.model.embed_tokens.load_state_dict(base.model.embed_tokens.state_dict())
    expanded.model.norm.load_state_dict(base.model.norm.state_dict())
    expanded.lm_head.load_state_dict(base.lm_head.state_dict())
    for target, source in zip(expanded.model.layers, sources):
        target.load_state_dict(source.state_dict())
    return expanded


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-sliding"])
def test_new_blocks_start_as_identity_including_cached_generation(make_model):
    make = lambda: make_model(num_layers=4)  # noqa: E731
    inputs = llama_inputs(length=6)
    base = make()
    model = get_peft_model(make(), LlamaProConfig(num_new_blocks=2)).eval()
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-6, rtol=0)
    assert torch.equal(greedy(model, inputs), greedy(base, inputs))
    config = model.base_model.model.config
    assert config.num_hidden_layers == 6
    if make_model is tiny_qwen2:
        assert config.layer_types == base.config.layer_types + ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-sliding"])
def test_trained_blocks_generate_like_a_plainly_expanded_model(make_model):
    make = lambda: make_model(num_layers=4)  # noqa: E731
    inputs = llama_inputs(length=6)
    model = get_peft_model(make(), LlamaProConfig(num_new_blocks=2)).eval()
    randomize_adapter(model, "default", seed=0, scale=0.2)
    reference = plainly_expanded(make, model, group_ends=[1, 3])
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)
    cached = greedy(model, inputs)
    assert torch.equal(cached, greedy(reference, inputs))
    assert torch.equal(cached, greedy(model, inputs, use_cache=False))


def test_exactly_the_new_blocks_train_with_twelve_layers():
    model = get_peft_model(tiny_llama(num_layers=12), LlamaProConfig(num_new_blocks=6))
    layers = model.base_model.model.model.layers
    assert [i for i, layer in enumerate(layers) if isinstance(layer, LlamaProLayer)] == [1, 3, 5, 7, 9, 11]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    per_layer = len(list(tiny_llama(num_layers=1).model.layers[0].parameters()))
    assert len(trainable) == 6 * per_layer
    assert all(".llamapro_blocks.default." in name for name in trainable)
    assert not any(p.requires_grad for p in layers[10].parameters())
    assert not any(p.requires_grad for p in layers[1].base_layer.parameters())


def test_checkpoint_holds_only_new_blocks_and_loads_back(tmp_path):
    inputs = llama_inputs()
    model = get_peft_model(tiny_llama(num_layers=4), LlamaProConfig(num_new_blocks=2)).eval()
    randomize_adapter(model, "default", seed=1)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    per_layer = len(tiny_llama(num_layers=1).model.layers[0].state_dict())
    assert len(saved) == 2 * per_layer and all(".llamapro_blocks." in key for key in saved)
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=4), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_merge_and_unload_gives_a_plain_model_that_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    inputs = llama_inputs()
    model = get_peft_model(tiny_llama(num_layers=4), LlamaProConfig(num_new_blocks=2)).eval()
    randomize_adapter(model, "default", seed=2, scale=0.2)
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert [layer.self_attn.layer_idx for layer in merged.model.layers] == list(range(6))
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 6
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-6, rtol=0)


def test_deactivate_runs_the_original_layers_and_reactivate_the_expanded_ones():
    inputs = llama_inputs()
    base = logits(tiny_llama(num_layers=4), inputs)
    model = Swift.prepare_model(tiny_llama(num_layers=4), {"pro": LlamaProConfig(num_new_blocks=2)}).eval()
    randomize_adapter(model, "pro", seed=3, scale=0.2)
    expanded = logits(model, inputs)
    assert (expanded - base).abs().max() > 1e-3
    model.deactivate_adapter("pro")
    torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    model.activate_adapter("pro")
    torch.testing.assert_close(logits(model, inputs), expanded, atol=0, rtol=0)


def test_second_adapter_gets_its_own_cache_slots_and_delete_compacts_them():
    model = get_peft_model(tiny_llama(num_layers=4), LlamaProConfig(num_new_blocks=2))
    model.add_adapter("more", LlamaProConfig(num_new_blocks=4))
    layers = model.base_model.model.model.layers
    slots = sorted(
        block.self_attn.layer_idx
        for layer in layers
        if isinstance(layer, LlamaProLayer)
        for blocks in layer.llamapro_blocks.values()
        for block in blocks
    )
    assert slots == list(range(4, 10)) and model.base_model.model.config.num_hidden_layers == 10
    model.delete_adapter("default")
    assert model.base_model.model.config.num_hidden_layers == 8
    model.delete_adapter("more")
    assert model.base_model.model.config.num_hidden_layers == 4


def test_new_blocks_share_the_model_config():
    model = get_peft_model(tiny_llama(num_layers=4), LlamaProConfig(num_new_blocks=2))
    block = model.base_model.model.model.layers[1].llamapro_blocks["default"][0]
    assert block.self_attn.config is model.base_model.model.config


def test_swift_checkpoint_with_substring_selected_extra_layers_is_refused():
    # ms-swift with 12 layers and 12 blocks saves block 1 by the substring "model.layers.1", which also matches the
    # original layers 10, 12, ..., 18 of the 24-layer expanded model
    blocks = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(1, 24, 2)]
    extras = [f"model.layers.{i}.mlp.down_proj.weight" for i in (10, 12, 14, 16, 18)]
    weights = {key: torch.zeros(1) for key in blocks + extras}
    with pytest.raises(ValueError, match="substring"):
        state_dict_from_swift("llamapro", weights, "default", None, None)
    renamed = state_dict_from_swift("llamapro", {key: torch.zeros(1) for key in blocks}, "default", None, None)
    # expanded index 2k + 1 is the block after original layer k
    assert set(renamed) == {f"model.layers.{k}.llamapro_blocks.default.0.mlp.down_proj.weight" for k in range(12)}


def test_other_tuners_are_not_copied_into_new_blocks():
    from peft import LoraConfig

    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = Swift.prepare_model(tiny_llama(num_layers=4), {"lora": lora, "pro": LlamaProConfig(num_new_blocks=2)})
    blocks = [
        b
        for layer in model.model.model.layers
        if isinstance(layer, LlamaProLayer)
        for b in layer.llamapro_blocks["pro"]
    ]
    assert blocks and not any(isinstance(m, BaseTunerLayer) for block in blocks for m in block.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_new_blocks": 3}, "must divide the number of decoder layers"),
        ({"num_new_blocks": 2, "layers_path": "model.missing"}, "layers_path"),
        ({"num_new_blocks": 2, "output_projections": ["nothing"]}, "output_projections"),
        ({"num_new_blocks": 2, "layers_path": "model.layers", "output_projections": ["nothing"]}, "identity"),
    ],
)
def test_bad_settings_raise_before_the_model_changes(kwargs, message):
    model = tiny_llama(num_layers=4)
    before = state_hash(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, LlamaProConfig(**kwargs))
    assert state_hash(model) == before and model.config.num_hidden_layers == 4
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_unknown_architecture_needs_layers_path():
    model = tiny_bert()
    before = state_hash(model)
    with pytest.raises(ValueError, match="set layers_path"):
        get_peft_model(model, LlamaProConfig(num_new_blocks=2))
    assert state_hash(model) == before


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_counts_must_be_positive_integers(value):
    with pytest.raises(ValueError, match="LlamaProConfig.num_new_blocks"):
        LlamaProConfig(num_new_blocks=value)
    with pytest.raises(ValueError, match="LlamaProConfig.num_groups"):
        LlamaProConfig(num_new_blocks=2, num_groups=value)
