"""Seeded random models (nothing is downloaded), their batches and losses, at the check's two sizes.

The configurations follow ``tests/contract/cases`` and ``tests/tiny_models.py`` (copied, not imported: ``tests/``
does not travel to the GPU machine), with the widths taken from the size.
"""

from __future__ import annotations

import torch

# "check": the size compared against a CPU float32 run of the same steps (the CPU side must stay cheap).
# "bench": the size whose step time and peak memory are compared with plain PEFT LoRA (GPU mode only; the dry run
# uses the check size for both, its timings mean nothing).
SIZES = {
    "check": {
        "llama": {"hidden": 64, "layers": 4, "heads": 4, "vocab": 256, "batch": 2, "seq": 32},
        "bert": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 256, "batch": 2, "seq": 32},
        "vit": {"hidden": 64, "layers": 2, "heads": 4, "batch": 2, "image": 16, "patch": 4},
        "unet": {"channels": 32, "batch": 2, "sample": 8},
    },
    "dry": {
        "llama": {"hidden": 32, "layers": 4, "heads": 4, "vocab": 128, "batch": 2, "seq": 12},
        "bert": {"hidden": 32, "layers": 2, "heads": 4, "vocab": 128, "batch": 2, "seq": 10},
        "vit": {"hidden": 32, "layers": 2, "heads": 4, "batch": 2, "image": 16, "patch": 4},
        "unet": {"channels": 16, "batch": 2, "sample": 8},
    },
    "bench": {
        "llama": {"hidden": 1024, "layers": 4, "heads": 16, "vocab": 32000, "batch": 4, "seq": 1024},
        "bert": {"hidden": 768, "layers": 4, "heads": 12, "vocab": 30522, "batch": 8, "seq": 512},
        "vit": {"hidden": 768, "layers": 4, "heads": 12, "batch": 16, "image": 224, "patch": 16},
        "unet": {"channels": 128, "batch": 4, "sample": 64},
    },
}


def build(family: str, size: dict, seed: int = 0) -> torch.nn.Module:
    """A seeded, randomly initialised model of ``family`` in train mode, on the current default device."""
    torch.manual_seed(seed)
    if family == "unet":
        from diffusers import UNet2DConditionModel

        c = size["channels"]
        return UNet2DConditionModel(
            sample_size=size["sample"], in_channels=4, out_channels=4, block_out_channels=(c, 2 * c),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8,
        ).train()  # fmt: skip
    h, heads = size["hidden"], size["heads"]
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=size["vocab"], hidden_size=h, intermediate_size=5 * h // 2, num_hidden_layers=size["layers"],
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
            attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(config).train()
    if family == "bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=size["vocab"], hidden_size=h, intermediate_size=4 * h, num_hidden_layers=size["layers"],
            num_attention_heads=heads, max_position_embeddings=max(64, size["seq"]), attn_implementation="sdpa",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertModel(config, add_pooling_layer=False).train()
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            image_size=size["image"], patch_size=size["patch"], num_channels=3, hidden_size=h,
            intermediate_size=4 * h, num_hidden_layers=size["layers"], num_attention_heads=heads,
            attn_implementation="sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return ViTModel(config, add_pooling_layer=False).train()
    raise ValueError(f"unknown family {family!r}")


def batch(family: str, size: dict, device, dtype: torch.dtype | None = None, seed: int = 1) -> dict:
    """One seeded input batch (floating inputs in ``dtype`` when given); Llama's carries its labels."""
    g = torch.Generator().manual_seed(seed)
    b = size["batch"]
    if family == "llama":
        ids = torch.randint(0, size["vocab"], (b, size["seq"]), generator=g)
        out = {"input_ids": ids, "labels": ids.clone()}
    elif family == "bert":
        ids = torch.randint(0, size["vocab"], (b, size["seq"]), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding in one sequence, so the tuners that extend the mask are exercised
        out = {"input_ids": ids, "attention_mask": mask}
    elif family == "vit":
        out = {"pixel_values": torch.randn(b, 3, size["image"], size["image"], generator=g)}
    else:
        s = size["sample"]
        out = {
            "sample": torch.randn(b, 4, s, s, generator=g),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(b, 8, 32, generator=g),
        }
    return {
        k: v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
        for k, v in out.items()
    }


def main_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output[0]


_TARGETS: dict[tuple, torch.Tensor] = {}


def regression_target(shape: torch.Size, device) -> torch.Tensor:
    """A fixed, seeded random target of ``shape`` (the same values on every device)."""
    key = (tuple(shape), str(device))
    if key not in _TARGETS:
        generator = torch.Generator().manual_seed(7)
        _TARGETS[key] = torch.randn(tuple(shape), generator=generator).to(device)
    return _TARGETS[key]


def loss_of(family: str, output) -> torch.Tensor:
    """Llama: its own causal-LM loss. Others: mean squared error of the main output against a fixed random target.

    Not the mean square of the output alone: BERT's and ViT's outputs leave a LayerNorm, whose mean square is nearly
    constant, so that loss would have almost no gradient to compare.
    """
    if family == "llama":
        return output.loss.float()
    out = main_tensor(output).float()
    return (out - regression_target(out.shape, out.device)).pow(2).mean()


def unet_skip_dims(size: dict) -> tuple[list[str], list[int]]:
    """Up-block resnets of the (c, 2c) UNet above and the widths of the skip connections they receive."""
    c = size["channels"]
    names = ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    return names, [2 * c, c, c, c]
