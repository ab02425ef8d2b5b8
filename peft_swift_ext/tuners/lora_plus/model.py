from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft import LoraModel

from ...core.lora_rows import install_row_hooks
from ...core.rows import adapter_rows, checked_row_names, merged_adapters


class LoraPlusModel(LoraModel):
    """LoRA+ injects exactly LoRA's layers; registering it separately keeps its learning-rate options.

    Its mixed-adapter batches (``adapter_names=[...]``) run in one pass (:mod:`.rows`) instead of PEFT's one
    sub-batch per adapter.
    """

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        rows = checked_row_names(names, self.peft_config, self.model.training, merged_adapters(self.model), kwargs)
        install_row_hooks(self.model)
        with adapter_rows(rows):
            yield
