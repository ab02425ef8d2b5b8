from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig
from peft.utils import PeftType


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
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        self.peft_type = PeftType.PROMPT
        dims = self.dim if isinstance(self.dim, list) else [self.dim]
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
            raise ValueError(f"PromptConfig.dim must be a positive int or a list of them, got {self.dim!r}")
        if self.target_modules is None:
            raise ValueError("PromptConfig.target_modules must be set (a regex or a list of layer names)")
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        if self.embedding_pos is None:
            raise ValueError("PromptConfig.embedding_pos must be set (the hidden-states argument of the layers)")
        for name in ("embedding_pos", "attention_mask_pos", "position_embeddings_pos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, str, type(None))):
                raise ValueError(f"PromptConfig.{name} must be an int, a str or None, got {value!r}")
        length = self.prompt_length
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"PromptConfig.prompt_length must be a positive int, got {length!r}")
        for name in ("attach_front", "extract_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PromptConfig.{name} must be a bool, got {getattr(self, name)!r}")
