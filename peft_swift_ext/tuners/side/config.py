from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check
from .networks import SIDE_NETWORKS


@dataclass
class SideConfig(PeftConfig):
    """Side-tuning (Zhang et al., 2019), with SWIFT's field names and defaults.

    A targeted module's output becomes ``σ(α)·main + (1-σ(α))·side_net(input)`` with a learnable scalar
    ``α`` (initially 0) and a small side network fed with one of the module's inputs. Not mergeable.
    """

    dim: int | None = field(default=None, metadata={"help": "output size of the side network (= the blended output)"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "modules whose output is blended: a regex matching the whole module name (SWIFT), or a list "
            "of names matched by suffix; '' is the model itself (e.g. an image classifier's logits)"
        },
    )
    side_module_name: str = field(
        default="fcn4",
        metadata={
            "help": "the side network: 'fcn4' (small CNN on RGB images), 'mlp' (dim -> dim -> dim) or 'alexnet' "
            "(AlexNet features on images; randomly initialised, nothing is downloaded)"
        },
    )
    source_hidden_pos: int | str = field(
        default=0,
        metadata={"help": "the module input fed to the side network: an index (positional) or a name (keyword)"},
    )
    target_hidden_pos: int | str = field(
        default=0,
        metadata={
            "help": "the part of the module's output that is blended: an index (tuple) or a key (dict / "
            "ModelOutput); ignored when the output is a single tensor"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SIDE
        check.positive_int(self, "dim", "the blended output size")
        check.required(self, "target_modules", "a regex or a list of module names")
        check.target_list(self)
        if not isinstance(self.side_module_name, str) or self.side_module_name.lower() not in SIDE_NETWORKS:
            raise ValueError(
                f"SideConfig.side_module_name={self.side_module_name!r} is unknown; choose one of "
                f"{', '.join(SIDE_NETWORKS)}"
            )
        self.side_module_name = self.side_module_name.lower()
        check.position(self, "source_hidden_pos")
        check.position(self, "target_hidden_pos")
