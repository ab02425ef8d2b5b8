from __future__ import annotations

from peft import LoraModel


class LoraPlusModel(LoraModel):
    """LoRA+ injects exactly LoRA's layers; registering it separately keeps its learning-rate options."""
