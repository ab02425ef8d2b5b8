from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check

#: The largest noise scale accepted: the paper uses 5-15, and far beyond the noise drowns the embeddings.
MAX_NOISE_ALPHA = 1e4


@dataclass
class NEFTuneConfig(PeftConfig):
    """NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training.

    The noise is Uniform(-m, m) with m = noise_alpha / sqrt(L * d) (L: sequence length, d: embedding width),
    added only in training mode; eval outputs are untouched. The adapter has no weights.
    """

    noise_alpha: float = field(default=5.0, metadata={"help": "the noise scale alpha; m = alpha / sqrt(L * d)"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "the embedding module to add noise to (regex full match or list of name suffixes); None picks "
            "the model's input embeddings (get_input_embeddings()), and the resolved name is stored here"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.NEFTUNE
        check.positive_number(self, "noise_alpha", upper=MAX_NOISE_ALPHA)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
