from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import torch
from peft import LoraConfig
from peft.utils import PeftType

from ...core.validators import positive_number


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
        positive_number(self, "loraplus_lr_ratio")
        positive_number(self, "loraplus_lr_embedding")

    def optimizer_group(
        self, container: str, param: torch.Tensor, lr: float | None, weight_decay: float
    ) -> tuple[str, dict]:
        """The LoRA+ optimizer group of one of this adapter's parameters (``OptimizerGroupPolicy``).

        Args:
            container: the container the parameter sits in (``lora_A``, ``lora_B``, ``lora_embedding_A``...).
            param: the parameter (1-D parameters such as DoRA magnitudes go with B, as in PEFT).
            lr: the base learning rate (that of A); required.
            weight_decay: weight decay of the decayed groups.
        """
        if lr is None:
            raise ValueError("create_optimizer_param_groups needs lr=... for LoRA+ adapters (B's lr is lr * ratio)")
        if container.startswith("lora_embedding"):
            return "lora_plus_embedding", {"lr": self.loraplus_lr_embedding, "weight_decay": weight_decay}
        if container == "lora_B":
            return "lora_plus_B", {"lr": lr * self.loraplus_lr_ratio, "weight_decay": weight_decay}
        if param.ndim == 1:
            return "lora_plus_B_no_decay", {"lr": lr * self.loraplus_lr_ratio, "weight_decay": 0.0}
        return "lora_plus_A", {"lr": lr, "weight_decay": weight_decay}
