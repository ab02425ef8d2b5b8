"""ms-swift's checkpoint formats -> this package's: configs, state-dict keys, and PEFT's LoRA layout.

This layer sits above the tuners (it knows each tuner's layout) and below the ``swift`` facade, which reads
checkpoints through it.
"""

from .configs import config_from_dict, is_swift_native
from .peft_format import save_to_peft_format
from .state_dicts import state_dict_from_swift

__all__ = [
    "config_from_dict",
    "is_swift_native",
    "save_to_peft_format",
    "state_dict_from_swift",
]
