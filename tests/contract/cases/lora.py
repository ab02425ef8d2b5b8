from peft import LoraConfig

from peft_swift_ext import LoraPlusConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

CASES = [
    ContractCase(
        "lora-llama",
        tiny_llama,
        llama_inputs,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        mergeable=True,
    ),
    ContractCase(
        "loraplus-llama",
        tiny_llama,
        llama_inputs,
        lambda: LoraPlusConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], loraplus_lr_ratio=8.0),
        mergeable=True,
    ),
]
