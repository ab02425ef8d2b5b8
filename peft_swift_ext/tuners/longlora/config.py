from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig
from peft.utils import PeftType

from ...core import validators as check


@dataclass
class LongLoraConfig(LoraConfig):
    """LongLoRA (Chen et al., 2024): LoRA, trainable embeddings and norms, and shifted sparse attention in training.

    In training mode attention runs within groups of ``g`` tokens, and for half of the heads the groups are shifted
    by ``g / 2`` so information flows between neighbouring groups. Eval mode uses full attention, so the trained
    adapter is an ordinary LoRA (plus the embedding and norm weights) and merges like one.
    """

    embedder_and_normalizer: str | list[str] = field(
        default_factory=lambda: ["embed", "norm"],
        metadata={
            "help": "parameters trained in full besides LoRA: a regex full-matched against parameter names, or a "
            "list of substrings of parameter names (SWIFT's rule); their modules become modules_to_save"
        },
    )
    group_size_ratio: float = field(
        default=0.25, metadata={"help": "group size as a fraction of the sequence length: g = int(L * ratio)"}
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "a fixed group size in tokens, used instead of group_size_ratio; keeps attention memory linear "
            "in the sequence length"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LONGLORA
        check.positive_number(self, "group_size_ratio", upper=1)
        if self.group_size is not None:
            check.positive_int(self, "group_size", minimum=2)
        names = self.embedder_and_normalizer
        if isinstance(names, (list, tuple)):
            self.embedder_and_normalizer = names = list(names)
        if not (isinstance(names, str) or all(isinstance(name, str) and name for name in names)):
            raise ValueError(
                f"LongLoraConfig.embedder_and_normalizer must be a regex or a list of names, got {names!r}"
            )
