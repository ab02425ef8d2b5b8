from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

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
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()
        self.peft_type = PeftType.SCEDIT
        for name in ("dims", "target_modules"):
            if getattr(self, name) in (None, [], ""):
                raise ValueError(f"SCEditConfig.{name} must be set")
        dims = self.dims if isinstance(self.dims, list) else [self.dims]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise ValueError(f"SCEditConfig.dims must be a positive int or a list of them, got {self.dims!r}")
        if self.tuner_mode not in TUNER_MODES:
            raise ValueError(f"SCEditConfig.tuner_mode must be one of {list(TUNER_MODES)}, got {self.tuner_mode!r}")
        if self.tuner_op != "SCEAdapter":
            raise ValueError(f"SCEditConfig.tuner_op must be 'SCEAdapter', got {self.tuner_op!r}")
        ratio = self.down_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            raise ValueError(f"SCEditConfig.down_ratio must be a positive number, got {ratio!r}")
        too_narrow = [d for d in dims if int(d * ratio) < 1]
        if too_narrow:
            raise ValueError(f"SCEditConfig.down_ratio={ratio} leaves no hidden units for dims {too_narrow}")
