from functools import partial

from peft_swift_ext import LlamaProConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

CASES = [
    ContractCase(
        "llamapro-llama",
        partial(tiny_llama, num_layers=4),
        llama_inputs,
        lambda: LlamaProConfig(num_new_blocks=2),
        mergeable=True,
    ),
]
