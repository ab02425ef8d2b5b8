"""ms-swift's checkpoint formats -> this package's: configs, state-dict keys, and PEFT's LoRA layout.

This layer sits above the tuners (it knows each tuner's layout) and below the ``swift`` facade, which reads
checkpoints through it.
"""

from .configs import config_from_dict, is_swift_native
from .peft_format import save_to_peft_format, to_peft_lora_config
from .state_dicts import rename_swift_keys, state_dict_from_swift

__all__ = [
    "config_from_dict",
    "is_swift_native",
    "rename_swift_keys",
    "save_to_peft_format",
    "state_dict_from_swift",
    "to_peft_lora_config",
]
