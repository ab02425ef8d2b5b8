from peft_swift_ext import ResTuningConfig

from ...tiny_models import tiny_unet, tiny_vit, unet_inputs, vit_inputs
from ..case import ContractCase

CASES = [
    ContractCase(
        "restuning-vit",
        tiny_vit,
        vit_inputs,
        # ms-swift's ViT recipe: embeddings -> one res_adapter block per layer -> replaces the final norm's input.
        lambda: ResTuningConfig(
            dims=32,
            root_modules=r"layers\.0",
            stem_modules=r"layers\.\d+",
            target_modules="layernorm",
            tuner_cfg="res_adapter",
        ),
    ),
    ContractCase(
        "restuning-unet",
        tiny_unet,
        unet_inputs,
        # ms-swift's Stable Diffusion recipe scaled down: mid block and up blocks feed grouped adapters with
        # upsampling; the bypass replaces the input of the output norm.
        lambda: ResTuningConfig(
            dims=[64, 64, 32],
            root_modules="mid_block",
            stem_modules=["mid_block", "up_blocks.0", "up_blocks.1"],
            target_modules="conv_norm_out",
            tuner_cfg="res_group_adapter",
            use_upsample=True,
            upsample_out_channels=[64, 32, None],
            zero_init_last=True,
        ),
    ),
]
