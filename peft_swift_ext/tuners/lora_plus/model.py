from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft import LoraModel
from torch import nn

from ...core.lora_rows import ScopedLoraAdapters, install_row_hooks
from ...core.rows import RowCountCheck, mixed_batch_call
from ...core.tuner import forget_adapter_configs


class LoraPlusModel(RowCountCheck, ScopedLoraAdapters, LoraModel):
    """LoRA+ injects exactly LoRA's layers; registering it separately keeps its learning-rate options.

    Its mixed-adapter batches (``adapter_names=[...]``) run in one pass (:mod:`.rows`) instead of PEFT's one
    sub-batch per adapter.
    """

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        with mixed_batch_call(self, args, kwargs, prepare=install_row_hooks):
            yield

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        forget_adapter_configs(model)  # peft < 0.19 leaves them on the unloaded model
        return model
