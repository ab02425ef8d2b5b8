"""NEFTune's noise and the embedding wrapper that adds it."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import SwiftTunerLayer

# The attribute the HF Trainer (and TRL's SFTTrainer through it) sets on the input embeddings when its own
# ``neftune_noise_alpha`` is in use; its hook would add a second dose of noise on top of ours.
TRAINER_NEFTUNE_ATTR = "neftune_noise_alpha"


class NEFTuneNoise(nn.Module):
    """Uniform(-m, m) noise with m = alpha / sqrt(L * d) for embeddings of shape (..., L, d).

    Args:
        alpha: the noise scale.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def magnitude(self, embeddings: torch.Tensor) -> float:
        """m for these embeddings (sequence length times width under the square root)."""
        return self.alpha / math.sqrt(embeddings.shape[-2] * embeddings.shape[-1])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        m = self.magnitude(embeddings)
        return torch.empty_like(embeddings).uniform_(-m, m)

    def extra_repr(self) -> str:
        """``alpha=...`` in the module's printed form."""
        return f"alpha={self.alpha}"


class NEFTuneEmbedding(SwiftTunerLayer):
    """An input-embedding module whose output gets each active adapter's noise in training mode.

    Args:
        base_layer: the embedding module (``nn.Embedding`` or a subclass, or another tuner's wrapper of one).
    """

    adapter_layer_names = ("neftune_noise",)
    tuner_name = "NEFTune"
    # the noise is a training-time regulariser with no weights: "merging" only switches it off
    merges_by_marking = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.neftune_noise = nn.ModuleDict()

    def update_layer(self, adapter_name: str, noise_alpha: float) -> None:
        """Add (or replace) one adapter's noise.

        Args:
            adapter_name: the adapter's name.
            noise_alpha: NEFTune's alpha (noise magnitude ``alpha / sqrt(seq_len * dim)``).
        """
        self.neftune_noise[adapter_name] = NEFTuneNoise(noise_alpha)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        output = self.base_layer(*args, **kwargs)
        if not self.training:
            return output
        names = [name for name in self.adapters_to_apply() if name not in self.merged_adapters]
        if names:
            self._refuse_trainer_noise(names)
        for name in names:
            output = output + self.neftune_noise[name](output)
        return output

    def _refuse_trainer_noise(self, names: list[str]) -> None:
        # This layer and every module it wraps, followed through ``base_layer`` children only: ``get_base_layer()``
        # asks each module for ``base_layer`` with ``hasattr``, which PEFT's ``modules_to_save`` wrapper (LongLoRA's
        # trained embedding copy) answers by indexing its active adapters; on peft < 0.21 that raises IndexError
        # when none of its adapters is active.
        module = self
        while module is not None:
            alpha = module.__dict__.get(TRAINER_NEFTUNE_ATTR)
            if alpha is not None:
                raise ValueError(
                    f"NEFTune adapter(s) {names} already add noise to these embeddings, and the trainer's "
                    f"neftune_noise_alpha={alpha} would add it a second time; set neftune_noise_alpha=None in the "
                    "TrainingArguments / SFTConfig, or remove the NEFTune adapter"
                )
            module = module._modules.get("base_layer")
