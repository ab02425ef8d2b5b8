from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check


@dataclass
class LlamaProConfig(PeftConfig):
    """LLaMA-PRO block expansion (Wu et al., 2024).

    The decoder layers are split into ``num_groups`` equal groups; after each group,
    ``num_new_blocks / num_groups`` copies of the group's last layer are inserted with their output projections
    zeroed, so each new block starts as the identity (its residual branches add zero). Only the new blocks train.
    """

    num_new_blocks: int | None = field(
        default=None, metadata={"help": "how many blocks to add in all; must divide the number of decoder layers"}
    )
    num_groups: int | None = field(
        default=None,
        metadata={
            "help": "how many equal groups the layers are split into, new blocks going after each group's last "
            "layer; must divide num_new_blocks; None means num_new_blocks (one new block per group)"
        },
    )
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "module path of the decoder-layer nn.ModuleList (e.g. 'model.layers'); None detects it for "
            "Llama, Mistral, Qwen2/3, Gemma and Phi-3 style models"
        },
    )
    output_projections: list[str] = field(
        default_factory=lambda: ["o_proj", "down_proj"],
        metadata={
            "help": "names (last path component) of the modules inside a decoder layer whose weight and bias are "
            "zeroed in the new blocks: the projections that write into the residual stream"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LLAMAPRO
        if self.num_groups is None:
            self.num_groups = self.num_new_blocks
        check.positive_int(self, "num_new_blocks")
        check.positive_int(self, "num_groups")
        if self.num_new_blocks % self.num_groups:
            raise ValueError(
                f"LlamaProConfig.num_new_blocks={self.num_new_blocks} must be a multiple of "
                f"num_groups={self.num_groups} (each group gets the same number of new blocks)"
            )
        self.output_projections = list(self.output_projections)
        if not self.output_projections or not all(isinstance(n, str) and n for n in self.output_projections):
            raise ValueError(
                f"LlamaProConfig.output_projections must be non-empty names, got {self.output_projections!r}"
            )
