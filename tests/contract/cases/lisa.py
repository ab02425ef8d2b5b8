from functools import partial

from peft_swift_ext import LisaConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

# LISA trains the base model's own weights in place: its "adapter weights" are the embeddings and head it saves (and
# the decoder layers once they receive gradients), so randomising them changes the base model itself.
IN_PLACE = (
    "LISA changes the base model's own weights, so the base outputs are gone once they changed; switching it off "
    "is refused after training (tests/techniques/test_lisa_method.py, tests/peft_generic)"
)
ONE_ADAPTER = "a model takes one LISA adapter: two would train the same tensors"

CASES = [
    ContractCase(
        "lisa-llama",
        partial(tiny_llama, num_layers=2),
        llama_inputs,
        lambda: LisaConfig(n_layers=1),
        mergeable=True,
        not_applicable={
            "test_load_adapter_under_second_name_and_switch": ONE_ADAPTER,
            "test_several_adapters_of_one_type": ONE_ADAPTER,
            "test_delete_adapter_keeps_the_other": ONE_ADAPTER,
            "test_disable_adapter_gives_base_outputs": IN_PLACE,
            "test_unload_restores_base_exactly": IN_PLACE,
            "test_swift_deactivate_gives_base_and_activate_restores": IN_PLACE,
            "test_swift_mixed_with_lora_switches_each_alone": IN_PLACE,
        },
    ),
]
