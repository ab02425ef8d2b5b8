from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check

TUNER_MODES = ("decoder", "encoder", "identity")


@dataclass
class SCEditConfig(PeftConfig):
    """SCEdit's SC-Tuner (Jiang et al., 2023) on a UNet's skip connections, with ms-swift's field names.

    ``decoder`` mode edits the skip half of each target's input ``[hidden, skip]``; ``encoder`` and
    ``identity`` modes edit the target's output. With ``hint_modules`` it is the controllable CSC-Tuner:
    the hint module's output is added before the tuner, ``x + T(x + hint)``.
    """

    dims: int | list[int] | None = field(
        default=None,
        metadata={
            "help": "channels edited at each target (the skip channels in decoder mode): one int or one per target"
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "regex (full match, matches in model order) or list of exact module names (list order); "
            "a ModuleList stands for its last module, as in ms-swift"
        },
    )
    hint_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "modules whose outputs are the hint (condition) features, one per target, same order"},
    )
    tuner_mode: str = field(
        default="decoder",
        metadata={"help": "'decoder' (edit the skip input), 'encoder' or 'identity' (edit the output)"},
    )
    tuner_op: str = field(default="SCEAdapter", metadata={"help": "the tuner; only 'SCEAdapter' exists"})
    down_ratio: float = field(
        default=1.0, metadata={"help": "hidden width of the tuner as a fraction of its dims (int(dim * down_ratio))"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SCEDIT
        if self.target_modules in (None, [], ""):
            raise ValueError("SCEditConfig.target_modules must be set (a regex or a list of module names)")
        dims = check.positive_ints(self, "dims")
        if self.tuner_mode not in TUNER_MODES:
            raise ValueError(f"SCEditConfig.tuner_mode must be one of {list(TUNER_MODES)}, got {self.tuner_mode!r}")
        if self.tuner_op != "SCEAdapter":
            raise ValueError(f"SCEditConfig.tuner_op must be 'SCEAdapter', got {self.tuner_op!r}")
        ratio = check.positive_number(self, "down_ratio")
        if not all(math.isfinite(d * ratio) for d in dims):
            raise ValueError(f"SCEditConfig.down_ratio={ratio} gives hidden widths beyond any number")
        too_narrow = [d for d in dims if int(d * ratio) < 1]
        if too_narrow:
            raise ValueError(f"SCEditConfig.down_ratio={ratio} leaves no hidden units for dims {too_narrow}")
