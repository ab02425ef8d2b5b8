"""PEFT's own methods, which must pass through the Swift shim unchanged."""

import peft
from packaging.version import Version
from peft import AdaLoraConfig, FourierFTConfig, LoraConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

CASES = [
    ContractCase(
        "dora-llama",
        tiny_llama,
        llama_inputs,
        lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
        mergeable=True,
    ),
    ContractCase(
        "rslora-llama",
        tiny_llama,
        llama_inputs,
        lambda: LoraConfig(r=4, target_modules=["k_proj", "down_proj"], use_rslora=True, init_lora_weights=False),
        mergeable=True,
    ),
    ContractCase(
        "adalora-llama",
        tiny_llama,
        llama_inputs,
        lambda: AdaLoraConfig(target_r=2, init_r=4, total_step=10, target_modules=["q_proj", "v_proj"]),
        mergeable=True,
        one_trainable_adapter=True,
        known_defects={
            "test_low_cpu_mem_usage_load_gives_same_outputs": "peft<0.20 leaves AdaLoRA's ranknum on the meta device"
        }
        if Version(peft.__version__) < Version("0.20")
        else {},
    ),
    ContractCase(
        "fourierft-llama",
        tiny_llama,
        llama_inputs,
        lambda: FourierFTConfig(n_frequency=16, scaling=10.0, target_modules=["q_proj", "v_proj"]),
        mergeable=True,
    ),
]
