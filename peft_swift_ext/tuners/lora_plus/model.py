from __future__ import annotations

from peft import LoraModel
from torch import nn

from ...core.tuner import forget_adapter_configs


class LoraPlusModel(LoraModel):
    """LoRA+ injects exactly LoRA's layers; registering it separately keeps its learning-rate options."""

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        forget_adapter_configs(model)  # peft < 0.19 leaves them on the unloaded model
        return model
