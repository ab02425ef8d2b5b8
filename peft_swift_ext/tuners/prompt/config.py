from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check


@dataclass
class PromptConfig(PeftConfig):
    """Prompt tuning inside the layers; Visual Prompt Tuning (Jia et al., 2022) on a ViT.

    ``prompt_length`` learnable tokens are concatenated to the hidden states entering the first targeted
    layer; every deeper targeted layer replaces those positions with its own tokens (deep VPT). Field names
    and defaults are SWIFT's. Not mergeable.
    """

    dim: int | list[int] | None = field(
        default=None,
        metadata={"help": "hidden size of the targeted layers; a list gives one size per targeted layer, in order"},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "the layers that get prompts (e.g. r'.*layer\\.\\d+$'): a regex matching the whole module name, "
            "or a list of names matched by suffix"
        },
    )
    embedding_pos: int | str | None = field(
        default=None,
        metadata={"help": "the layer's hidden-states argument: an index (positional) or a name (keyword)"},
    )
    attention_mask_pos: int | str | None = field(
        default=None,
        metadata={"help": "the layer's attention-mask argument, extended by the prompt tokens; None: no mask"},
    )
    attention_mask_value: float | int | bool = field(
        default=0.0,
        metadata={
            "help": "mask value of the prompt positions in numeric masks (0.0 = attend in additive masks); "
            "boolean masks get True (attend) unless this is a bool"
        },
    )
    prompt_length: int = field(default=16, metadata={"help": "number of prompt tokens per layer"})
    attach_front: bool = field(
        default=True, metadata={"help": "put the prompt tokens before the sequence (True) or after it"}
    )
    extract_embedding: bool = field(
        default=False,
        metadata={"help": "remove the prompt tokens from the output of the last targeted layer"},
    )
    position_embeddings_pos: int | str | None = field(
        default=None,
        metadata={
            "help": "the layer's rotary (cos, sin) argument, e.g. 'position_embeddings' for Llama; the prompt "
            "tokens get the rotary position of their neighbouring token. Not a SWIFT field"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT
        check.positive_ints(self, "dim")
        check.required(self, "target_modules", "a regex or a list of layer names")
        check.target_list(self)
        check.required(self, "embedding_pos", "the hidden-states argument of the layers")
        check.position(self, "embedding_pos")
        check.position(self, "attention_mask_pos", optional=True)
        check.position(self, "position_embeddings_pos", optional=True)
        check.positive_int(self, "prompt_length")
        check.boolean(self, "attach_front", "extract_embedding")
