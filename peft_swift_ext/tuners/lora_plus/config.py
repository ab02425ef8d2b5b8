from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from peft import LoraConfig
from peft.utils import PeftType

# SWIFT's LoRA options that PEFT's LoraConfig cannot express; a checkpoint that sets them is refused.
_SWIFT_ONLY_LORA_FIELDS = {"lora_dtype": None, "use_qa_lora": False, "use_merged_linear": False, "enable_lora": None}
_SWIFT_BOOKKEEPING = {"swift_type", "model_key_mapping", "lorap_lr_ratio", "lorap_emb_lr"}


@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA+ (Hayou et al., 2024): LoRA whose B matrices learn ``loraplus_lr_ratio`` times faster than A.

    The adapter itself is plain LoRA (it merges and converts to PEFT's LoRA format); only the optimizer
    groups differ. Build them with ``SwiftModel.create_optimizer_param_groups`` or
    :func:`peft_swift_ext.create_lora_plus_optimizer`. SWIFT's names ``lorap_lr_ratio`` and
    ``lorap_emb_lr`` are accepted as keyword arguments.
    """

    loraplus_lr_ratio: float = field(
        default=16.0, metadata={"help": "learning rate of B over that of A (ηB/ηA); the paper recommends 10-16"}
    )
    loraplus_lr_embedding: float = field(
        default=1e-6, metadata={"help": "learning rate of the LoRA matrices of embedding layers"}
    )
    lorap_lr_ratio: InitVar[float | None] = None
    lorap_emb_lr: InitVar[float | None] = None

    def __post_init__(self, lorap_lr_ratio: float | None = None, lorap_emb_lr: float | None = None) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORAPLUS
        if lorap_lr_ratio is not None:
            self.loraplus_lr_ratio = lorap_lr_ratio
        if lorap_emb_lr is not None:
            self.loraplus_lr_embedding = lorap_emb_lr
        for name in ("loraplus_lr_ratio", "loraplus_lr_embedding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LoraPlusConfig.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_swift_dict(cls, config: dict) -> tuple[type[LoraConfig], dict]:
        """Map an ms-swift ``LoRAConfig`` dict to a config class and its fields.

        Plain LoRA when ``lorap_lr_ratio`` is unset, LoRA+ otherwise; SWIFT-only options that change the
        adapter (e.g. ``lora_dtype``) raise ``ValueError``.
        """
        set_options = {
            key: config[key] for key, default in _SWIFT_ONLY_LORA_FIELDS.items() if config.get(key, default) != default
        }
        if set_options:
            raise ValueError(f"SWIFT LoRA options without a PEFT equivalent are set: {set_options}")
        fields = {k: v for k, v in config.items() if k not in _SWIFT_BOOKKEEPING and k not in _SWIFT_ONLY_LORA_FIELDS}
        fields.pop("peft_type", None)
        if config.get("lorap_lr_ratio") is None:
            return LoraConfig, fields
        fields["loraplus_lr_ratio"] = config["lorap_lr_ratio"]
        if config.get("lorap_emb_lr") is not None:
            fields["loraplus_lr_embedding"] = config["lorap_emb_lr"]
        return cls, fields
