from peft_swift_ext import SCEditConfig

from ...tiny_models import tiny_unet, unet_inputs
from ..case import ContractCase

CASES = [
    ContractCase(
        "scedit-unet",
        tiny_unet,
        unet_inputs,
        # decoder mode on every up-block resnet; dims are the skip widths (64, 32, 32, 32 in tiny_unet)
        lambda: SCEditConfig(dims=[64, 32, 32, 32], target_modules=r"up_blocks\.\d+\.resnets\.\d+"),
    ),
]
