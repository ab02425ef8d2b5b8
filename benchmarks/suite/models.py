"""Base models and inputs of the suite, built from seeded random weights (nothing is downloaded).

Only torch, transformers and diffusers are imported here: ms-swift's worker uses this module too, so both sides
train the same architecture on the same input.
"""

from __future__ import annotations

import torch

# Every size of a family is a dict of plain numbers so that it travels as JSON to the workers.
QUICK = {
    "llama": {"hidden": 32, "layers": 2, "vocab": 128, "batch": 2, "seq": 16},
    "bert": {"hidden": 32, "layers": 2, "vocab": 128, "batch": 2, "seq": 16},
    "vit": {"hidden": 32, "layers": 2, "batch": 2, "image": 16, "patch": 4},
    "unet": {"channels": 16, "batch": 2, "sample": 8},
}
FULL = {
    "llama": {"hidden": 256, "layers": 8, "vocab": 4096, "batch": 2, "seq": 128},
    "bert": {"hidden": 256, "layers": 6, "vocab": 4096, "batch": 2, "seq": 128},
    "vit": {"hidden": 256, "layers": 6, "batch": 2, "image": 64, "patch": 4},
    "unet": {"channels": 32, "batch": 2, "sample": 32},
}


def describe(family: str, size: dict) -> str:
    if family == "unet":
        c = size["channels"]
        return f"UNet2DConditionModel ({c}, {2 * c}) channels, sample {size['sample']}²×4, batch {size['batch']}"
    if family == "vit":
        tokens = (size["image"] // size["patch"]) ** 2 + 1
        return f"ViT {size['layers']}×{size['hidden']}, {tokens} tokens, batch {size['batch']}"
    name = {"llama": "Llama", "bert": "BERT"}[family]
    return f"{name} {size['layers']}×{size['hidden']}, vocab {size['vocab']}, seq {size['seq']}, batch {size['batch']}"


def unet_skip_dims(size: dict) -> tuple[list[str], list[int]]:
    """Up-block resnets and the widths of the skip connections they receive, for the (c, 2c) UNet below."""
    c = size["channels"]
    names = ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    return names, [2 * c, c, c, c]


def build(family: str, size: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "unet":
        from diffusers import UNet2DConditionModel

        c = size["channels"]
        return UNet2DConditionModel(
            sample_size=size["sample"], in_channels=4, out_channels=4, block_out_channels=(c, 2 * c),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8,
        )  # fmt: skip
    h = size["hidden"]
    heads = max(4, h // 32)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=size["vocab"], hidden_size=h, intermediate_size=2 * h, num_hidden_layers=size["layers"],
            num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096,
            attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if family == "bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=size["vocab"], hidden_size=h, intermediate_size=2 * h, num_hidden_layers=size["layers"],
            num_attention_heads=heads, max_position_embeddings=4096, attn_implementation="sdpa",
        )  # fmt: skip
        return BertModel(config, add_pooling_layer=False)
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            image_size=size["image"], patch_size=size["patch"], num_channels=3, hidden_size=h,
            intermediate_size=2 * h, num_hidden_layers=size["layers"], num_attention_heads=heads,
            attn_implementation="sdpa",
        )  # fmt: skip
        return ViTModel(config, add_pooling_layer=False)
    raise ValueError(family)


def inputs(family: str, size: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = size["batch"]
    if family in ("llama", "bert"):
        # No attention mask: ms-swift's Prompt cannot extend transformers 5's 4-D masks (fixtures NOTES.md).
        return {"input_ids": torch.randint(0, size["vocab"], (b, size["seq"]), generator=g)}
    if family == "vit":
        return {"pixel_values": torch.randn(b, 3, size["image"], size["image"], generator=g)}
    s = size["sample"]
    return {
        "sample": torch.randn(b, 4, s, s, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(b, 8, 32, generator=g),
    }


def main_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


def loss(output) -> torch.Tensor:
    # The same loss on every side (the models' own losses differ per family); its value is irrelevant here.
    return main_tensor(output).float().pow(2).mean()
