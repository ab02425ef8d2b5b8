from peft_swift_ext import PromptConfig

from ...tiny_models import bert_inputs, llama_deep_prompt, llama_inputs, tiny_bert, tiny_llama, tiny_vit, vit_inputs
from ..case import ContractCase

CASES = [
    ContractCase(
        "prompt-bert",
        tiny_bert,
        bert_inputs,
        lambda: PromptConfig(
            dim=32,
            target_modules=r"encoder\.layer\.\d+",
            embedding_pos=0,
            attention_mask_pos=1,
            prompt_length=4,
            extract_embedding=True,
        ),
    ),
    ContractCase(
        "vpt-vit",
        tiny_vit,
        vit_inputs,
        lambda: PromptConfig(
            dim=32, target_modules=r"layers\.\d+", embedding_pos=0, prompt_length=4, extract_embedding=True
        ),
    ),
    ContractCase(
        "prompt-llama",
        tiny_llama,
        llama_inputs,
        lambda: llama_deep_prompt(),
    ),
]
