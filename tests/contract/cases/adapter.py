from peft_swift_ext import AdapterConfig

from ...tiny_models import bert_inputs, llama_inputs, tiny_bert, tiny_llama, tiny_vit, vit_inputs
from ..case import ContractCase

CASES = [
    ContractCase(
        "adapter-bert",
        tiny_bert,
        bert_inputs,
        lambda: AdapterConfig(dim=32, target_modules=r"encoder\.layer\.\d+\.output", hidden_pos=0, adapter_length=8),
    ),
    ContractCase(
        "adapter-vit",
        tiny_vit,
        vit_inputs,
        lambda: AdapterConfig(dim=32, target_modules=r"layers\.\d+\.mlp", adapter_length=8, act_layer="relu"),
    ),
    ContractCase(
        "adapter-llama",
        tiny_llama,
        llama_inputs,
        lambda: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
    ),
]
