from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check
from .spec import check_tuner_cfg

_HOOKS = ("input", "output")


@dataclass
class ResTuningConfig(PeftConfig):
    """Res-Tuning (Jiang et al., 2023) in bypass mode, with ms-swift's field names and defaults.

    Detached features of a root module and of each stem module feed a small bypass network (one block of
    lateral + vertical tuners per stem); its output replaces the input (or output) of the target module.
    No gradient flows through the backbone, so its activations are not kept for backward.
    """

    dims: int | list[int] | None = field(
        default=None, metadata={"help": "feature width of each bypass block: one int for all, or one per stem"}
    )
    root_modules: str | None = field(
        default=None,
        metadata={
            "help": "regex (full match) of the module whose feature starts the bypass; the first match is used. "
            "None: the input of the first stem module"
        },
    )
    root_modules_hook: str = field(default="input", metadata={"help": "take the root module's 'input' or 'output'"})
    stem_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "regex (full match, every match in model order) or list of exact module names (in list order) "
            "whose features feed the bypass blocks, one block per module"
        },
    )
    stem_modules_hook: str = field(default="output", metadata={"help": "take each stem module's 'input' or 'output'"})
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "regex (full match) or list of names selecting the one module the bypass output feeds"},
    )
    target_modules_hook: str = field(
        default="input", metadata={"help": "replace the target's 'input' or its 'output' by the bypass output"}
    )
    target_hidden_pos: int | str | None = field(
        default=None,
        metadata={
            "help": "which input argument (position or keyword) or output element (index or key) is replaced; "
            "None means 0"
        },
    )
    tuner_cfg: str | dict | list | None = field(
        default="res_adapter",
        metadata={
            "help": "the bypass tuners: 'res_adapter', 'res_group_adapter', 'upsample', 'zero' or 'identity'; "
            "a dict {'lateral_cfg', 'vertical_cfg', 'aux_cfg'} of names or {name: options}; or a list, one per block"
        },
    )
    use_upsample: bool = field(
        default=False,
        metadata={"help": "upsample each block's output (but the last) to the next stem's spatial size"},
    )
    upsample_out_channels: int | list[int | None] | None = field(
        default=None,
        metadata={"help": "output channels of a zero-initialised 3x3 convolution after each upsampling (None: none)"},
    )
    zero_init_last: bool = field(
        default=False, metadata={"help": "zero-initialise the last linear layer of the last block's adapters"}
    )
    use_bypass: bool = field(
        default=True, metadata={"help": "bypass mode; the only mode ms-swift implements, so it must stay True"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RESTUNING
        if self.target_hidden_pos is None:
            self.target_hidden_pos = 0
        self._check()

    def _check(self) -> None:
        for name in ("dims", "stem_modules", "target_modules"):
            if getattr(self, name) in (None, [], ""):
                raise ValueError(f"ResTuningConfig.{name} must be set")
        check.positive_ints(self, "dims")
        for name in ("root_modules_hook", "stem_modules_hook", "target_modules_hook"):
            if getattr(self, name) not in _HOOKS:
                raise ValueError(f"ResTuningConfig.{name} must be 'input' or 'output', got {getattr(self, name)!r}")
        if self.root_modules is not None and not isinstance(self.root_modules, str):
            raise ValueError(f"ResTuningConfig.root_modules must be a regex string, got {self.root_modules!r}")
        check.position(self, "target_hidden_pos")
        channels = self.upsample_out_channels
        channels = channels if isinstance(channels, list) else [channels]
        if not all(c is None or (check.is_int(c) and c > 0) for c in channels):
            raise ValueError(
                "ResTuningConfig.upsample_out_channels must be None, a positive int or a list of those, "
                f"got {self.upsample_out_channels!r}"
            )
        if not self.use_bypass:
            raise ValueError("ResTuningConfig.use_bypass=False is not implemented (ms-swift only has bypass mode)")
        check_tuner_cfg(self.tuner_cfg)
