from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType
from transformers.activations import ACT2CLS

from ...core import validators as check


@dataclass
class AdapterConfig(PeftConfig):
    """Houlsby-style bottleneck adapters (Houlsby et al., 2019), with SWIFT's field names and defaults.

    The hidden state a targeted module returns becomes ``h + W2·act(W1·h)`` (``dim -> adapter_length ->
    dim``). Not mergeable: it changes activations, not weights.
    """

    dim: int | None = field(default=None, metadata={"help": "size of the hidden state the adapter transforms"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "modules whose output is adapted: a regex matching the whole module name, or a list of names "
            "matched by suffix"
        },
    )
    hidden_pos: int | str | None = field(
        default=None,
        metadata={
            "help": "which part of the module's output is the hidden state: an index (tuple output) or a key "
            "(dict / ModelOutput); ignored when the output is a single tensor"
        },
    )
    method_name: str = field(
        default="forward",
        metadata={
            "help": "the method of the target whose return value is adapted; 'forward' or another method the "
            "module's forward calls on itself (e.g. BERT's 'feed_forward_chunk')"
        },
    )
    adapter_length: int = field(default=128, metadata={"help": "bottleneck width (the intermediate size)"})
    act_layer: str = field(
        default="gelu", metadata={"help": "activation between the two projections; a name in transformers' ACT2CLS"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADAPTER
        check.positive_int(self, "dim", "the hidden size")
        check.required(self, "target_modules", "a regex or a list of module names")
        check.target_list(self)
        check.positive_int(self, "adapter_length")
        check.position(self, "hidden_pos", optional=True)
        if not isinstance(self.method_name, str) or not self.method_name.isidentifier():
            raise ValueError(f"AdapterConfig.method_name must be a method name, got {self.method_name!r}")
        if self.act_layer not in ACT2CLS:
            raise ValueError(
                f"AdapterConfig.act_layer={self.act_layer!r} is unknown; choose one of {', '.join(sorted(ACT2CLS))}"
            )
