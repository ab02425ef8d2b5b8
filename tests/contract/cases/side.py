from peft_swift_ext import SideConfig

from ...tiny_models import bert_inputs, tiny_bert
from ..case import ContractCase

CASES = [
    ContractCase(
        "side-bert",
        tiny_bert,
        bert_inputs,
        # BertOutput(hidden_states, input_tensor): the side MLP reads the residual input (32-dim).
        lambda: SideConfig(
            dim=32, target_modules=r"encoder\.layer\.\d+\.output", side_module_name="mlp", source_hidden_pos=1
        ),
    ),
]
