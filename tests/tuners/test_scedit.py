"""SCEdit's mechanics: skip-channel editing, output editing, hints, training, lifecycle and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_swift_ext import SCEditConfig
from peft_swift_ext.conversion import state_dict_from_swift
from peft_swift_ext.tuners.scedit.layer import SCEditLayer

from ..helpers import base_of, randomize_adapter, run, state_hash
from ..tiny_models import tiny_unet, unet_inputs

SKIPS = [64, 32, 32, 32]  # skip widths into up_blocks.{0,1}.resnets.{0,1} of tiny_unet
DECODER_TARGETS = r"up_blocks\.\d+\.resnets\.\d+"
pick = lambda output: output.sample  # noqa: E731


def adapted(config: SCEditConfig, seed: int = 0, model: nn.Module | None = None):
    peft_model = get_peft_model(tiny_unet() if model is None else model, config)
    randomize_adapter(peft_model, "default", seed=seed, scale=0.1)
    return peft_model.eval()


def tuner_reference(x: torch.Tensor, layer: SCEditLayer, name: str = "default") -> torch.Tensor:
    """``x + W2 gelu(W1 x + b1) + b2`` per pixel, with einsum over the channel dimension."""
    down, up = layer.scedit_ln1[name], layer.scedit_ln2[name]
    hidden = F.gelu(torch.einsum("bchw,dc->bdhw", x, down.weight) + down.bias[:, None, None])
    return x + torch.einsum("bdhw,cd->bchw", hidden, up.weight) + up.bias[:, None, None]


def inputs_seen_by(module: nn.Module, model: nn.Module) -> torch.Tensor:
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]) and None)
    run(model, unet_inputs(), pick)
    handle.remove()
    return seen[0]


def input_before_and_after_edit(layer: SCEditLayer, model: nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The input the tuner layer receives and the one its wrapped resnet then gets, in one forward."""
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda m, args: seen.append(args[0]) and None) for m in (layer, layer.base_layer)
    ]
    with torch.no_grad():
        model(**(inputs or unet_inputs()))
    for handle in handles:
        handle.remove()
    return seen[0], seen[1]


def test_decoder_mode_edits_only_the_skip_channels():
    model = adapted(SCEditConfig(dims=SKIPS, target_modules=DECODER_TARGETS))
    layer = base_of(model).up_blocks[0].resnets[1]
    original, edited = input_before_and_after_edit(layer, model)
    hidden = original.shape[1] - 32
    torch.testing.assert_close(edited[:, :hidden], original[:, :hidden], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(edited[:, hidden:], tuner_reference(original[:, hidden:], layer), atol=1e-5, rtol=0)


def test_skip_channels_are_the_ones_the_up_block_concatenates():
    # diffusers builds cat([hidden, skip]); the skip is the down path's feature popped for this resnet
    model = tiny_unet()
    skips = []
    handle = model.up_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: skips.append(kwargs["res_hidden_states_tuple"]) and None, with_kwargs=True
    )
    inputs_to_resnet = inputs_seen_by(model.up_blocks[0].resnets[0], model)
    handle.remove()
    torch.testing.assert_close(inputs_to_resnet[:, -SKIPS[0] :], skips[0][-1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        SCEditConfig(dims=SKIPS, target_modules=DECODER_TARGETS),
        SCEditConfig(dims=[32, 32], tuner_mode="encoder", target_modules=["conv_in", "down_blocks.0.downsamplers"]),
    ],
    ids=["decoder", "encoder"],
)
def test_identity_at_initialisation(config):
    model = get_peft_model(tiny_unet(), config).eval()
    torch.testing.assert_close(run(model, unet_inputs(), pick), run(tiny_unet(), unet_inputs(), pick), atol=0, rtol=0)


def test_encoder_mode_edits_the_output():
    model = adapted(SCEditConfig(dims=32, tuner_mode="encoder", target_modules=["conv_in"]))
    conv_in = base_of(model).conv_in
    outputs = []
    handle = conv_in.register_forward_hook(lambda m, a, o: outputs.append(o) and None)
    base_handle = conv_in.base_layer.register_forward_hook(lambda m, a, o: outputs.append(o) and None)
    run(model, unet_inputs(), pick)
    handle.remove()
    base_handle.remove()
    base_output, edited = outputs
    with torch.no_grad():
        torch.testing.assert_close(edited, tuner_reference(base_output, conv_in), atol=1e-5, rtol=0)


def test_a_module_list_target_means_its_last_module_and_tuple_outputs_keep_their_other_elements():
    # down_blocks.0 returns (hidden, skip states); ms-swift kept only the first element, which breaks the UNet
    config = SCEditConfig(
        dims=[32, 32], tuner_mode="encoder", target_modules=["down_blocks.0.downsamplers", "down_blocks.0"]
    )
    model = adapted(config)
    assert isinstance(base_of(model).down_blocks[0].downsamplers[0], SCEditLayer)
    assert (run(model, unet_inputs(), pick) - run(tiny_unet(), unet_inputs(), pick)).abs().max() > 1e-4


class HintedUNet(nn.Module):
    """A UNet with a small condition encoder giving one hint per edited skip connection (CSC-Tuner)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.unet = tiny_unet()
        self.hints = nn.ModuleList(nn.Conv2d(3, c, 3, padding=1, stride=s) for c, s in [(64, 2), (32, 2)])

    def forward(self, condition: torch.Tensor, **unet_inputs):
        for hint in self.hints:
            hint(condition)
        return self.unet(**unet_inputs)


def test_hint_features_are_added_before_the_tuner():
    config = SCEditConfig(
        dims=[64, 32],
        target_modules=["unet.up_blocks.0.resnets.0", "unet.up_blocks.0.resnets.1"],
        hint_modules=["hints.0", "hints.1"],
    )
    model = adapted(config, model=HintedUNet())
    condition = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    layer = base_of(model).unet.up_blocks[0].resnets[1]
    original, edited = input_before_and_after_edit(layer, model, condition=condition, **unet_inputs())
    with torch.no_grad():
        hint = base_of(model).hints[1](condition)
    hidden = original.shape[1] - 32
    skip = original[:, hidden:]
    with torch.no_grad():
        expected = skip + (tuner_reference(skip + hint, layer) - (skip + hint))  # x + T(x + hint)
    torch.testing.assert_close(edited[:, hidden:], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(edited[:, :hidden], original[:, :hidden], atol=0, rtol=0)


def test_a_missing_hint_is_a_clear_error():
    config = SCEditConfig(dims=[64], target_modules=["unet.up_blocks.0.resnets.0"], hint_modules=["hints.0"])
    model = adapted(config, model=HintedUNet())
    with pytest.raises(RuntimeError, match=r"needs the features of \['hints.0'\]"):
        model.base_model.model.unet(**unet_inputs())


def test_training_lowers_the_loss_and_trains_only_the_tuners():
    model = adapted(SCEditConfig(dims=SKIPS, target_modules=DECODER_TARGETS)).train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("scedit_ln" in n for n, _ in trainable)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(**unet_inputs()).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert state_hash(model.unload()) == state_hash(tiny_unet())


def test_merge_is_refused_naming_the_tuner_and_unload_restores_base():
    model = adapted(SCEditConfig(dims=SKIPS, target_modules=DECODER_TARGETS))
    before = state_hash(model)
    with pytest.raises(ValueError, match="SCEdit"):
        model.merge_and_unload()
    assert state_hash(model) == before
    unloaded = model.unload()
    assert not any(isinstance(m, SCEditLayer) for m in unloaded.modules())
    torch.testing.assert_close(
        run(unloaded, unet_inputs(), pick), run(tiny_unet(), unet_inputs(), pick), atol=0, rtol=0
    )


def test_swift_checkpoint_keys_are_translated():

    weights = {"up_blocks.0.resnets.1.scetuner_a.tuner_op.ln2.bias": torch.zeros(3)}
    translated = state_dict_from_swift("scedit", weights, "a", None, None)
    assert list(translated) == ["up_blocks.0.resnets.1.scedit_ln2.a.bias"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            dict(dims=[64, 32, 16, 32], target_modules=DECODER_TARGETS),
            r"dims\[2\]=16 does not fit the skip connection into 'up_blocks.1.resnets.0', which carries 32 channels",
        ),
        (dict(dims=[64, 32, 32], target_modules=DECODER_TARGETS), "dims has 3 entries but target_modules selects 4"),
        (dict(dims=32, target_modules=r"up_blocks\.9\.resnets\.\d+"), "target_modules=.* matches no module"),
        (dict(dims=32, target_modules=["up_blocks.1.resnets.7"]), "names modules the model does not have"),
        (
            dict(dims=16, tuner_mode="encoder", target_modules=["conv_in"]),
            r"dims\[0\]=16 does not fit 'conv_in', which outputs 32",
        ),
        (
            dict(dims=[64, 32, 32, 32], target_modules=DECODER_TARGETS, hint_modules=["conv_in"]),
            "hint_modules selects 1 modules but target_modules selects 4",
        ),
    ],
)
def test_bad_targets_and_dims_are_refused_before_the_model_changes(config, message):
    model = tiny_unet()
    before = state_hash(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, SCEditConfig(**config))
    assert state_hash(model) == before
    assert not any(isinstance(m, SCEditLayer) for m in model.modules())


def test_dims_wider_than_the_input_are_refused_on_any_model():
    model = nn.Sequential(nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match=r"dims\[0\]=8 does not fit '0': its input has 8 channels"):
        get_peft_model(model, SCEditConfig(dims=8, target_modules=["0"]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tuner_mode": "middle"}, "tuner_mode must be one of"),
        ({"tuner_op": "LoRA"}, "tuner_op must be 'SCEAdapter'"),
        ({"down_ratio": 0}, "down_ratio must be a finite number > 0"),
        ({"down_ratio": 0.01}, "leaves no hidden units"),
        ({"dims": [32, -1]}, "dims must be a positive int"),
    ],
)
def test_invalid_config_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SCEditConfig(**{"dims": 32, "target_modules": DECODER_TARGETS, **fields})
