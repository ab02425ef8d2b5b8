"""The options of LISA, one class for the PEFT method and for the plain-model scheduler."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from peft import PeftConfig
from peft.utils import PeftType

from ...core import validators as check

_DEFAULT_INTERVAL = 20


@dataclass
class LisaConfig(PeftConfig):
    """LISA, layerwise importance sampling (Pan et al., 2024), as SWIFT uses it.

    Every ``interval`` optimizer steps all decoder layers are frozen and ``n_layers`` of them, drawn uniformly
    without replacement, are unfrozen; the input embeddings and the output head train or not by option. As a PEFT
    method (``get_peft_model(model, LisaConfig(...))``) it adds no weights: it trains the base model's own
    decoder layers in place, and ``save_pretrained`` writes the full tensors of every layer that ever received a
    gradient (plus the embeddings and head when they train). The same config drives
    :class:`~peft_swift_ext.techniques.LisaScheduler` and :class:`~peft_swift_ext.techniques.LisaCallback` on
    plain models.

    SWIFT's names ``lisa_activated_layers`` and ``lisa_step_interval`` are accepted as aliases of ``n_layers`` and
    ``interval``.
    """

    n_layers: int | None = field(
        default=None, metadata={"help": "decoder layers trained at a time (required; SWIFT: lisa_activated_layers)"}
    )
    interval: int = field(
        default=_DEFAULT_INTERVAL,
        metadata={"help": "optimizer steps between two draws of active layers (SWIFT: lisa_step_interval)"},
    )
    train_embeddings: bool = field(default=True, metadata={"help": "keep the input embeddings trainable"})
    train_head: bool = field(
        default=True,
        metadata={"help": "keep the output head trainable (a head tied to the embeddings trains if either is on)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the layer draws, independent of the global RNG"})
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "dotted path of the nn.ModuleList of decoder layers, e.g. 'model.layers'; None finds it "
            "(the largest list of repeated blocks)"
        },
    )
    checkpoint_frozen_layers: bool = field(
        default=False,
        metadata={
            "help": "recompute frozen decoder layers in the backward pass (activation checkpointing) instead of "
            "keeping their activations; saves most of their activation memory for one extra forward of those layers"
        },
    )
    trained_layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "indices of the decoder layers that have received a gradient so far; filled in while training "
            "and saved, so that loading knows which layers the checkpoint holds. Leave empty."
        },
    )
    lisa_activated_layers: InitVar[int | None] = None
    lisa_step_interval: InitVar[int | None] = None

    def __post_init__(self, lisa_activated_layers: int | None = None, lisa_step_interval: int | None = None) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LISA
        if lisa_activated_layers is not None:
            if self.n_layers not in (None, lisa_activated_layers):
                raise ValueError(
                    f"n_layers={self.n_layers} and lisa_activated_layers={lisa_activated_layers} disagree"
                )
            self.n_layers = lisa_activated_layers
        if lisa_step_interval is not None:
            if self.interval not in (_DEFAULT_INTERVAL, lisa_step_interval):
                raise ValueError(f"interval={self.interval} and lisa_step_interval={lisa_step_interval} disagree")
            self.interval = lisa_step_interval
        if self.n_layers is None:
            raise ValueError("LisaConfig needs n_layers (SWIFT: lisa_activated_layers)")
        check.positive_int(self, "n_layers")
        check.positive_int(self, "interval")
        if not check.is_int(self.seed):
            raise ValueError(f"LisaConfig.seed must be an integer, got {self.seed!r}")
        check.boolean(self, "train_embeddings", "train_head", "checkpoint_frozen_layers")
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path):
            raise ValueError(f"LisaConfig.layers_path must be a module path or None, got {self.layers_path!r}")
        layers = self.trained_layers
        if not isinstance(layers, (list, tuple)) or not all(check.is_int(i) and i >= 0 for i in layers):
            raise ValueError(f"LisaConfig.trained_layers must be a list of layer indices, got {layers!r}")
        self.trained_layers = sorted(set(layers))
