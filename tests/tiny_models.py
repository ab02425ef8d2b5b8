"""Tiny, seeded, randomly initialised models and inputs for the tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(num_layers: int = 2, seed: int = 0, **overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def llama_inputs(batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=generator)}


def llama_deep_prompt(prompt_length: int = 4, dim: int = 32):
    """A ``PromptConfig`` for every decoder layer of a Llama model such as :func:`tiny_llama` (hidden size ``dim``):
    tokens added before each layer and removed after it, the layer's attention mask and rotary table extended to
    cover them."""
    from peft_swift_ext import PromptConfig

    return PromptConfig(
        dim=dim,
        target_modules=r"model\.layers\.\d+",
        embedding_pos=0,
        attention_mask_pos="attention_mask",
        position_embeddings_pos="position_embeddings",
        prompt_length=prompt_length,
        extract_embedding=True,
    )


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    _seeded(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def bert_inputs(batch: int = 2, length: int = 10, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 128, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_vit(seed: int = 0, num_layers: int = 2) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    _seeded(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def tiny_vit_classifier(seed: int = 0, num_labels: int = 5) -> nn.Module:
    """A tiny ViTForImageClassification (16x16 RGB images, ``num_labels`` classes), computing its own loss."""
    from transformers import ViTConfig, ViTForImageClassification

    _seeded(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def vit_inputs(batch: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


def tiny_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=generator),
    }


def main_output(output) -> torch.Tensor:
    """The tensor that matters in a model's output: logits, last hidden state or sample."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find the main tensor in {type(output).__name__}")
