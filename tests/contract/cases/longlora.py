from peft_swift_ext import LongLoraConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

CASES = [
    ContractCase(
        "longlora-llama",
        tiny_llama,
        llama_inputs,
        lambda: LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        mergeable=True,
    ),
]
