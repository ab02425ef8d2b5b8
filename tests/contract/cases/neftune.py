from peft_swift_ext import NEFTuneConfig

from ...tiny_models import llama_inputs, tiny_llama
from ..case import ContractCase

CASES = [
    # NEFTune has no weights and changes outputs only in training mode; its statistics, the train/eval split and
    # mixing with other tuners in training are tested in tests/tuners/test_neftune.py.
    ContractCase(
        "neftune-llama",
        tiny_llama,
        llama_inputs,
        lambda: NEFTuneConfig(noise_alpha=5.0),
        mergeable=True,
        changes_eval_outputs=False,
    ),
]
