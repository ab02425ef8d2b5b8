"""The contract between a model that holds adapters of several types (``SwiftModel``) and the tuners.

Everything generic goes through the per-adapter containers of every tuner layer (:mod:`peft_swift_ext.core.keys`);
a tuner that needs more implements one of the protocols below, which the ``SwiftModel`` checks with ``isinstance``
(``docs/architecture.md`` tabulates who implements which). PEFT's own tuners implement none of them and need none.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType
from torch import nn


@runtime_checkable
class MergePolicy(Protocol):
    """A tuner that declares whether its adapters can be folded into the base weights.

    Tuners that change activations rather than weights (Adapter, Prompt, Side, ...) set ``mergeable = False``:
    merging them is refused before anything changes. Tuners without this attribute (PEFT's) merge as PEFT does.
    """

    mergeable: bool


@runtime_checkable
class StructureOwner(Protocol):
    """A tuner that changed the model outside its own layers and must undo that itself."""

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Tidy up after ``adapter_name``'s layers were deleted (e.g. renumber cache slots, restore attention).

        Args:
            adapter_name: the adapter that was just deleted.
        """

    def finalize_unload(self, merged: bool) -> None:
        """Undo what the tuner attached outside its layers, right before every tuner layer is removed.

        Args:
            merged: whether the adapters were merged first (tuners that add modules keep them then).
        """


@runtime_checkable
class InPlaceTuner(Protocol):
    """A tuner without layers of its own that trains (and saves) some of the base model's own tensors."""

    def saved_tensors(self) -> dict[str, nn.Parameter]:
        """The base parameters its checkpoint carries, by their path in the plain model."""

    def loadable_tensors(self) -> dict[str, nn.Parameter]:
        """Every base parameter one of its checkpoints may hold (a superset of :meth:`saved_tensors`)."""

    def mark_loaded(self, paths: list[str]) -> None:
        """Record that a checkpoint holding the base parameters at ``paths`` was loaded (they are saved from now on).

        Args:
            paths: the loaded parameters' paths in the plain model.
        """

    def trainable_parameters(self, all_candidates: bool = False) -> list[nn.Parameter]:
        """The base parameters it wants trainable now.

        Args:
            all_candidates: every parameter it may ever train (what an optimizer must hold from the start).
        """

    def check_can_restore(self, action: str) -> None:
        """Raise ``ValueError`` naming ``action`` once switching the adapter off can no longer restore the base.

        Args:
            action: what was asked, for the message (e.g. ``"be deactivated"``).
        """

    def peft_checkpoint_key(self, path: str) -> str:
        """The key under which PEFT's ``save_pretrained`` writes the base parameter at ``path``.

        Args:
            path: the parameter's path in the plain model.
        """


@runtime_checkable
class OptimizerGroupPolicy(Protocol):
    """A config whose adapter parameters need optimizer groups of their own (LoRA+ trains B faster than A)."""

    def optimizer_group(
        self, container: str, param: torch.Tensor, lr: float | None, weight_decay: float
    ) -> tuple[str, dict]:
        """The group one of its adapter's parameters belongs to: ``(group name, group options)``.

        Args:
            container: the per-adapter container the parameter sits in (``lora_A``, ``lora_B``, ...).
            param: the parameter.
            lr: the base learning rate given to the optimizer groups (None when not given).
            weight_decay: the weight decay given to the optimizer groups.
        """


@runtime_checkable
class TunerHost(Protocol):
    """A model wrapper holding tuners of several types over one base model (a ``SwiftModel``)."""

    def tuner_for(self, peft_type: PeftType) -> BaseTuner | None:
        """Its tuner of ``peft_type``, or None when it holds no adapter of that type.

        Args:
            peft_type: the tuner type.
        """


@runtime_checkable
class OptimizerGroupSource(Protocol):
    """A model that builds its optimizer parameter groups itself (``SwiftModel.create_optimizer_param_groups``)."""

    def create_optimizer_param_groups(self, **defaults) -> list[dict]:
        """Parameter groups, LoRA+ groups included.

        Args:
            **defaults (Any): group defaults such as ``lr`` and ``weight_decay``.
        """
