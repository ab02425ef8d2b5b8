"""Res-Tuning's mechanics: the bypass math, no gradient through the backbone, training, lifecycle, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_swift_ext import ResTuningConfig, Swift
from peft_swift_ext.tuners.restuning.layer import ResGroupAdapter, ResTuningLayer

from ..helpers import base_of, randomize_adapter, run, state_hash
from ..tiny_models import tiny_unet, tiny_vit, unet_inputs, vit_inputs

pick_hidden = lambda output: output.last_hidden_state  # noqa: E731


def vit_config(**overrides) -> ResTuningConfig:
    options = dict(
        dims=32,
        root_modules=r"layers\.0",
        stem_modules=r"layers\.\d+",
        target_modules="layernorm",
        tuner_cfg="res_adapter",
    )
    return ResTuningConfig(**{**options, **overrides})


def unet_config(**overrides) -> ResTuningConfig:
    options = dict(
        dims=[64, 64, 32],
        root_modules="mid_block",
        stem_modules=["mid_block", "up_blocks.0", "up_blocks.1"],
        target_modules="conv_norm_out",
        tuner_cfg="res_group_adapter",
        use_upsample=True,
        upsample_out_channels=[64, 32, None],
        zero_init_last=True,
    )
    return ResTuningConfig(**{**options, **overrides})


def adapted_vit(seed: int = 0, **overrides):
    model = get_peft_model(tiny_vit(), vit_config(**overrides))
    randomize_adapter(model, "default", seed=seed, scale=0.1)
    return model.eval()


def backbone_features(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """Embeddings output and every layer's output of a plain ViT, by forward hooks."""
    features = {}
    handles = [model.embeddings.register_forward_hook(lambda m, a, o: features.__setitem__("root", o))]
    for index, layer in enumerate(model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=index: features.__setitem__(i, o)))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return features


def res_adapter_reference(x: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """``x + W2 gelu(W1 x + b1) + b2`` written out with matrix products."""
    hidden = x @ adapter.ln1.weight.T + adapter.ln1.bias
    return x + F.gelu(hidden) @ adapter.ln2.weight.T + adapter.ln2.bias


# --- math ------------------------------------------------------------------------------------------------------


def test_bypass_output_replaces_target_input_as_in_the_paper():
    model = adapted_vit()
    inputs = vit_inputs()
    features = backbone_features(tiny_vit(), inputs)
    blocks = base_of(model).layernorm.restuning_bypass["default"].blocks
    with torch.no_grad():
        bypass = features["root"]
        for index, block in enumerate(blocks):
            bypass = res_adapter_reference(features[index], block.lateral) + res_adapter_reference(
                bypass, block.vertical
            )
        expected = base_of(model).layernorm.base_layer(bypass)
    torch.testing.assert_close(run(model, inputs, pick_hidden), expected, atol=1e-5, rtol=0)


def test_output_hook_on_the_last_layer_equals_input_hook_on_the_norm():
    # ms-swift's two ViT recipes: replace the norm's input, or the last layer's output; same bypass, same result
    by_input = adapted_vit()
    by_output = adapted_vit(target_modules=r"layers\.1", target_modules_hook="output")
    inputs = vit_inputs()
    torch.testing.assert_close(
        run(by_output, inputs, pick_hidden), run(by_input, inputs, pick_hidden), atol=1e-6, rtol=0
    )


def test_res_group_adapter_runs_one_shared_mlp_per_channel_group():
    torch.manual_seed(0)
    adapter = ResGroupAdapter(dim=8, group_dim=None, head=4, scale_factor=2, adapter_weight=None, zero_init=False)
    x = torch.randn(2, 8, 3, 3)
    expected = x.clone()
    for group in range(4):  # channel c * head + group belongs to the group (ms-swift's "(c h)" layout)
        channels = [c * 4 + group for c in range(2)]
        tokens = x[:, channels].flatten(2).transpose(1, 2)
        out = adapter.ln2(F.gelu(adapter.ln1(tokens))).transpose(1, 2).reshape(2, 2, 3, 3)
        expected[:, channels] += out
    torch.testing.assert_close(adapter(x), expected, atol=1e-6, rtol=0)


def test_zero_vertical_with_zero_init_last_is_the_identity_at_initialisation():
    inputs = vit_inputs()
    config = vit_config(
        stem_modules=[r"layers.1"],
        tuner_cfg={"lateral_cfg": "res_adapter", "vertical_cfg": "zero"},
        zero_init_last=True,
    )
    model = get_peft_model(tiny_vit(), config).eval()
    torch.testing.assert_close(run(model, inputs, pick_hidden), run(tiny_vit(), inputs, pick_hidden), atol=0, rtol=0)


def test_unet_recipe_with_zero_init_last_is_the_identity_at_initialisation():
    pick = lambda output: output.sample  # noqa: E731
    model = get_peft_model(tiny_unet(), unet_config()).eval()
    torch.testing.assert_close(run(model, unet_inputs(), pick), run(tiny_unet(), unet_inputs(), pick), atol=0, rtol=0)


# --- no gradient through the backbone ------------------------------------------------------------------------


def test_no_gradient_reaches_backbone_parameters_or_activations():
    model = adapted_vit()
    pixels = vit_inputs()["pixel_values"].requires_grad_()  # so backbone activations do have a graph
    reached = []

    def watch(module, args, output) -> None:
        output.register_hook(reached.append)

    hooks = [layer.register_forward_hook(watch) for layer in base_of(model).layers]
    model.train()
    model(pixel_values=pixels).last_hidden_state.square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert reached == []
    assert pixels.grad is None
    backbone = [p for n, p in model.named_parameters() if "restuning_bypass" not in n]
    assert all(p.grad is None for p in backbone)
    assert all(p.grad is not None for n, p in model.named_parameters() if "restuning_bypass" in n)


def test_backbone_internals_are_not_saved_for_backward():
    model = adapted_vit().train()
    internal: list[torch.Tensor] = []  # kept alive, so no later tensor can reuse their memory

    def keep(module, args, output) -> None:
        internal.append(output)

    hooks = [
        module.register_forward_hook(keep)
        for name, module in base_of(model).named_modules()
        if name.startswith("layers.") and not list(module.children())
    ]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(**vit_inputs()).last_hidden_state.square().mean()
    for hook in hooks:
        hook.remove()
    internal_memory = {t.untyped_storage().data_ptr() for t in internal}
    assert len(internal) > 10
    assert not [t for t in saved if t.untyped_storage().data_ptr() in internal_memory]
    loss.backward()


# --- training --------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_changes_only_the_bypass():
    model = adapted_vit()
    backbone_before = state_hash(tiny_vit())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("restuning_bypass" in n for n, p in model.named_parameters() if p.requires_grad)
    target = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = F.mse_loss(model(**vit_inputs()).last_hidden_state, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert state_hash(model.unload()) == backbone_before


# --- lifecycle -------------------------------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_merge_is_refused_naming_the_tuner_and_changes_nothing():
    model = adapted_vit()
    before = state_hash(model)
    with pytest.raises(ValueError, match="Res-Tuning"):
        model.merge_and_unload()
    assert state_hash(model) == before


def test_unload_removes_layers_and_hooks_and_restores_base_outputs():
    inputs = vit_inputs()
    plain = tiny_vit()
    hooks_before = hook_count(plain)
    unloaded = adapted_vit().unload()
    assert not any(isinstance(m, ResTuningLayer) for m in unloaded.modules())
    assert hook_count(unloaded) == hooks_before
    torch.testing.assert_close(run(unloaded, inputs, pick_hidden), run(plain, inputs, pick_hidden), atol=0, rtol=0)


def test_deleting_an_adapter_removes_its_hooks_only():
    model = adapted_vit()
    with_one = hook_count(model)
    model.add_adapter("second", vit_config())
    assert hook_count(model) == with_one + 3  # root + two stems
    model.delete_adapter("second")
    assert hook_count(model) == with_one


def test_features_are_not_kept_after_the_forward_nor_captured_when_inactive():
    model = adapted_vit()
    layer = base_of(model).layernorm
    run(model, vit_inputs(), pick_hidden)
    assert not layer.probes._local.__dict__.get("features")
    with model.disable_adapter():
        run(model, vit_inputs(), pick_hidden)
    assert not layer.probes._local.__dict__.get("features")


def test_concurrent_forwards_use_their_own_features():
    model = adapted_vit()
    batches = [vit_inputs(seed=s) for s in range(4)]
    expected = [run(model, batch, pick_hidden) for batch in batches]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def work(index: int) -> None:
        for _ in range(10):
            results[index].append(run(model, batches[index], pick_hidden))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, outputs in results.items():
        for output in outputs:
            torch.testing.assert_close(output, expected[index], atol=0, rtol=0)


def test_per_thread_activation_feeds_each_thread_its_own_adapter():
    model = Swift.prepare_model(tiny_vit(), {"a": vit_config(), "b": vit_config()}, per_thread=True).eval()
    randomize_adapter(model, "a", seed=1, scale=0.1)
    randomize_adapter(model, "b", seed=2, scale=0.1)
    inputs = vit_inputs()
    expected = {}
    for name in ("a", "b"):
        model.set_active_adapters([name])
        expected[name] = run(model, inputs, pick_hidden)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-3
    failures = []

    def work(name: str) -> None:
        model.set_active_adapters([name])  # per thread
        for _ in range(10):
            if not torch.equal(run(model, inputs, pick_hidden), expected[name]):
                failures.append(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b", "a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_deep_copy_hooks_the_copy_and_not_the_original():
    import copy

    model = adapted_vit()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in base_of(copied).layernorm.restuning_bypass.parameters():
            p.add_(0.5)
    inputs = vit_inputs()
    assert (run(copied, inputs, pick_hidden) - run(model, inputs, pick_hidden)).abs().max() > 1e-3
    copied.delete_adapter("default")
    torch.testing.assert_close(
        run(model, inputs, pick_hidden), run(adapted_vit(), inputs, pick_hidden), atol=0, rtol=0
    )


def test_mixed_with_scedit_and_lora_in_one_swift_model():
    from peft import LoraConfig

    from peft_swift_ext import SCEditConfig

    pick = lambda output: output.sample  # noqa: E731
    configs = {
        "rt": unet_config(),
        "sc": SCEditConfig(dims=[64, 32, 32, 32], target_modules=r"up_blocks\.\d+\.resnets\.\d+"),
        "lora": LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
    }
    model = Swift.prepare_model(tiny_unet(), configs).eval()
    for seed, name in enumerate(configs):
        randomize_adapter(model, name, seed=seed)
    alone = {}
    for name in configs:
        model.set_active_adapters([name])
        alone[name] = run(model, unet_inputs(), pick)
        single = Swift.prepare_model(tiny_unet(), {name: configs[name]}).eval()
        single.load_adapter_weights(name, model.adapter_state_dict(name), "memory", name)
        torch.testing.assert_close(run(single, unet_inputs(), pick), alone[name], atol=1e-6, rtol=0)
    model.set_active_adapters(list(configs))
    together = run(model, unet_inputs(), pick)
    assert all((together - out).abs().max() > 1e-4 for out in alone.values())


# --- bad input: clear errors, model unchanged ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stem_modules": r"blocks\.\d+"}, r"stem_modules='blocks\\\\.\\\\d\+' matches no module"),
        (
            {"stem_modules": ["layers.0", "layers.7"]},
            r"stem_modules names modules the model does not have: \['layers.7'\]",
        ),
        ({"root_modules": "encoder"}, "root_modules='encoder' matches no module"),
        ({"target_modules": "head"}, "target_modules='head' must select one module"),
        ({"target_modules": r"layers\.\d+"}, "must select one module; it matches"),
        ({"dims": 16}, r"dims: the bypass ends with 16 channels but the input of target 'layernorm' has 32"),
        ({"dims": [32, 32, 32]}, "dims has 3 entries but stem_modules selects 2 modules"),
    ],
)
def test_bad_config_is_refused_before_the_model_changes(overrides, message):
    model = tiny_vit()
    before, hooks = state_hash(model), hook_count(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, vit_config(**overrides))
    assert state_hash(model) == before
    assert hook_count(model) == hooks
    assert not any(isinstance(m, ResTuningLayer) for m in model.modules())


def test_wrong_dims_on_a_unet_stem_is_refused_before_the_model_changes():
    model = tiny_unet()
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"dims\[1\]=32 does not fit stem 'up_blocks.0' \(64 channels\)"):
        get_peft_model(model, unet_config(dims=[64, 32, 32], upsample_out_channels=[32, 32, None]))
    assert state_hash(model) == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tuner_cfg": "res_adaptor"}, "unknown tuner 'res_adaptor'"),
        ({"tuner_cfg": {"lateral_cfg": {"res_adapter": {"length": 8}}}}, r"'res_adapter' has no options \['length'\]"),
        ({"tuner_cfg": {"aux_cfg": "res_adapter"}}, "aux_cfg'] must be one of"),
        ({"target_modules_hook": "inputs"}, "target_modules_hook must be 'input' or 'output'"),
        ({"use_bypass": False}, "use_bypass=False is not implemented"),
        ({"dims": None}, "dims must be set"),
    ],
)
def test_invalid_config_fields_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        vit_config(**overrides)
