"""Side-tuning mechanics: the blend, the side networks, training, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_swift_ext import SideConfig
from peft_swift_ext.tuners.side.networks import FCN4, alexnet

from ..helpers import randomize_adapter, state_hash


class Block(nn.Module):
    """``forward(x, scale)`` returning ``(proj(x) * scale, x)``; the side net may read either input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return self.proj(x) * scale, x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Block()

    def forward(self, x, scale=1.0):
        return self.block(x, scale)


class ImageNet(nn.Module):
    """image -> features -> logits; ``backbone`` maps a (b, 3, H, W) image to (b, 5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values))


def mlp_by_hand(net, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ net.fc1.weight.T + net.fc1.bias) @ net.fc2.weight.T + net.fc2.bias


def test_output_blends_main_and_mlp_side_by_sigmoid_alpha_computed_by_hand():
    model = get_peft_model(Net(), SideConfig(dim=8, target_modules="block", side_module_name="mlp"))
    randomize_adapter(model, "default", seed=0, scale=0.5)
    layer = model.base_model.model.block
    x = torch.randn(3, 8)
    weight = torch.sigmoid(layer.side_alpha["default"])
    main, passthrough = Net()(x, 2.0)
    hidden, aux = model(x, 2.0)
    torch.testing.assert_close(hidden, weight * main + (1 - weight) * mlp_by_hand(layer.side_net["default"], x))
    torch.testing.assert_close(aux, passthrough, atol=0, rtol=0)


def test_alpha_starts_at_zero_so_the_first_blend_is_half_and_half():
    model = get_peft_model(Net(), SideConfig(dim=8, target_modules="block", side_module_name="mlp"))
    layer = model.base_model.model.block
    assert layer.side_alpha["default"].item() == 0.0
    x = torch.randn(3, 8)
    expected = 0.5 * Net()(x)[0] + 0.5 * mlp_by_hand(layer.side_net["default"], x)
    torch.testing.assert_close(model(x)[0], expected)


def test_source_and_target_positions_select_keyword_input_and_output_index():
    # the side net reads ``x`` given by keyword; the blended output is element 1 of the tuple
    config = SideConfig(
        dim=8, target_modules="block", side_module_name="mlp", source_hidden_pos="x", target_hidden_pos=1
    )
    model = get_peft_model(Net(), config)
    layer = model.base_model.model.block
    x = torch.randn(3, 8)
    hidden, aux = model.base_model.model.block(x=x)
    torch.testing.assert_close(hidden, Net().block(x)[0], atol=0, rtol=0)
    torch.testing.assert_close(aux, 0.5 * x + 0.5 * mlp_by_hand(layer.side_net["default"], x))


def test_fcn4_side_network_blends_with_an_image_backbone():
    model = get_peft_model(ImageNet(), SideConfig(dim=5, target_modules="backbone", side_module_name="fcn4"))
    randomize_adapter(model, "default", seed=1, scale=0.3)
    layer = model.base_model.model.backbone
    image = torch.randn(2, 3, 16, 16)
    weight = torch.sigmoid(layer.side_alpha["default"])
    plain = ImageNet()
    expected = plain.head(weight * plain.backbone(image) + (1 - weight) * layer.side_net["default"](image))
    torch.testing.assert_close(model(image), expected)


def test_fcn4_matches_its_layers_applied_by_hand():
    net = FCN4(out_dims=5)
    image = torch.randn(2, 3, 16, 16)
    h = image
    for block in (net.conv1, net.conv2, net.conv3, net.conv4):
        conv, norm = block[0], block[1]
        h = F.conv2d(h, conv.weight, stride=conv.stride, padding=conv.padding)
        h = F.relu(F.group_norm(h, 2, norm.weight, norm.bias, norm.eps))
    expected = h.mean((2, 3)) @ net.fc.weight.T + net.fc.bias
    torch.testing.assert_close(net(image), expected)


def test_alexnet_side_network_needs_no_download_and_keeps_torchvision_names():
    net = alexnet(out_dims=7)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert {"features.0.weight", "features.10.bias", "fc.weight"} <= set(net.state_dict())


def test_training_changes_only_side_weights_and_lowers_the_loss():
    model = get_peft_model(Net(), SideConfig(dim=8, target_modules="block", side_module_name="mlp"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".side_alpha.default" in n for n in trainable)
    assert all(".side_net.default." in n or n.endswith(".side_alpha.default") for n in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    x, target = torch.randn(32, 8), torch.randn(32, 8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x)[0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_merge_is_refused_naming_the_tuner_and_unload_restores_the_base():
    model = get_peft_model(Net(), SideConfig(dim=8, target_modules="block", side_module_name="mlp"))
    with pytest.raises(ValueError, match="Side adapters cannot be merged"):
        model.merge_and_unload()
    x = torch.randn(2, 8)
    torch.testing.assert_close(model.unload()(x)[0], Net()(x)[0], atol=0, rtol=0)


# --- refusals: clear errors, raised before the model changes ---------------------------------------------------


def refused(model: nn.Module, config: SideConfig, match: str) -> None:
    before = state_hash(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert state_hash(model) == before


def test_source_hidden_pos_that_is_not_an_argument_is_refused_before_injection():
    config = SideConfig(dim=8, target_modules="block", side_module_name="mlp", source_hidden_pos="y")
    refused(Net(), config, r"SideConfig.source_hidden_pos does not fit block: 'y' is not an argument")


def test_mlp_dim_that_does_not_fit_a_linear_target_is_refused_before_injection():
    config = SideConfig(dim=4, target_modules="block.proj", side_module_name="mlp")
    refused(Net(), config, r"SideConfig.dim=4 does not fit block.proj")


def test_module_list_target_is_refused_before_injection():
    holder = nn.Module()
    holder.blocks = nn.ModuleList([Block()])
    refused(holder, SideConfig(dim=8, target_modules="blocks", side_module_name="mlp"), "a ModuleList")


def test_wrong_dim_is_reported_at_the_first_forward_without_changing_weights():
    model = get_peft_model(ImageNet(), SideConfig(dim=7, target_modules="backbone", side_module_name="fcn4"))
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"the side network of backbone outputs shape \(2, 7\)"):
        model(torch.randn(2, 3, 16, 16))
    assert state_hash(model) == before


def test_target_hidden_pos_missing_from_the_output_names_the_field_and_module():
    config = SideConfig(dim=8, target_modules="block", side_module_name="mlp", target_hidden_pos=3)
    model = get_peft_model(Net(), config)
    with pytest.raises(ValueError, match=r"SideConfig.target_hidden_pos=3 does not exist in the output of block"):
        model(torch.randn(2, 8))


def test_unknown_side_network_is_refused_by_the_config():
    with pytest.raises(ValueError, match="SideConfig.side_module_name='resnet' is unknown"):
        SideConfig(dim=8, target_modules="block", side_module_name="resnet")


ROOT_FCN4 = SideConfig(dim=2, target_modules="", side_module_name="fcn4", source_hidden_pos="pixel_values")


def root_side_by_hand(model, image: torch.Tensor) -> torch.Tensor:
    """``σ(α)·logits + (1-σ(α))·fcn4(image)`` from the plain model and the layer's weights."""
    layer = model.base_model.model.root_side
    weight = torch.sigmoid(layer.side_alpha["default"])
    return weight * ImageNet()(image) + (1 - weight) * layer.side_net["default"](image)


def test_root_target_blends_the_models_own_output_as_in_swift():
    model = get_peft_model(ImageNet(), ROOT_FCN4)
    randomize_adapter(model, "default", seed=1, scale=0.3)
    image = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(pixel_values=image), root_side_by_hand(model, image))
    torch.testing.assert_close(model(image), root_side_by_hand(model, image))  # positional: resolved by name
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".root_side.side_" in n
    ]
    with model.disable_adapter():
        torch.testing.assert_close(model(pixel_values=image), ImageNet()(image))


def test_root_side_saves_loads_and_survives_deepcopy(tmp_path):
    from peft import PeftModel

    model = get_peft_model(ImageNet(), ROOT_FCN4)
    randomize_adapter(model, "default", seed=2, scale=0.3)
    image = torch.randn(2, 3, 16, 16)
    expected = model(pixel_values=image)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(ImageNet(), tmp_path)
    torch.testing.assert_close(reloaded(pixel_values=image), expected)

    copy = __import__("copy").deepcopy(model)
    with torch.no_grad():
        copy.base_model.model.root_side.side_alpha["default"].fill_(5.0)
    torch.testing.assert_close(model(pixel_values=image), expected)  # the copy routes through its own layer
    assert not torch.allclose(copy(pixel_values=image), expected)


def test_unload_gives_the_root_its_own_forward_back():
    base = ImageNet()
    before = state_hash(base)
    model = get_peft_model(base, ROOT_FCN4)
    randomize_adapter(model, "default", seed=3, scale=0.3)
    plain = model.unload()
    assert plain is base and "forward" not in vars(plain) and not hasattr(plain, "root_side")
    assert state_hash(plain) == before
    image = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(image), ImageNet()(image))


def test_root_side_mixes_with_lora_and_switches_in_a_swift_model(tmp_path):
    from peft import LoraConfig

    from peft_swift_ext import Swift

    image = torch.randn(2, 3, 16, 16)
    lora = LoraConfig(r=2, target_modules=["head"], init_lora_weights=False)
    model = Swift.prepare_model(ImageNet(), {"side": ROOT_FCN4, "lora": lora})
    head = model.base_model.head
    plain = ImageNet()

    def lora_only(image):
        features = plain.backbone(image)
        update = features @ head.lora_A["lora"].weight.T @ head.lora_B["lora"].weight.T
        return plain.head(features) + head.scaling["lora"] * update

    layer = model.base_model.root_side
    weight = torch.sigmoid(layer.side_alpha["side"])
    torch.testing.assert_close(model(image), weight * lora_only(image) + (1 - weight) * layer.side_net["side"](image))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(Swift.from_pretrained(ImageNet(), tmp_path)(image), model(image))
    model.deactivate_adapter("side")
    torch.testing.assert_close(model(image), lora_only(image))
    model.delete_adapter("side")
    torch.testing.assert_close(model(image), lora_only(image))


def test_only_side_may_target_the_root_and_the_refusal_leaves_the_model_alone():
    from peft_swift_ext import AdapterConfig

    base = ImageNet()
    before = state_hash(base)
    with pytest.raises(ValueError, match="AdapterConfig.target_modules='' selects the root model, which Adapter"):
        get_peft_model(base, AdapterConfig(dim=2, target_modules="", hidden_pos=0))
    assert state_hash(base) == before and "forward" not in vars(base)
