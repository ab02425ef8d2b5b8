"""``SwiftModel``: several adapters of different tuner types on one model, each switchable on its own.

PEFT's ``PeftModel`` holds adapters of one type and ``PeftMixedModel`` only a fixed list of built-in types,
so the composition lives here. The work is done in the modules beside this one (docs/architecture.md), through
the per-adapter containers every tuner layer shares (:mod:`peft_swift_ext.core.keys`) and the tuner protocols of
:mod:`peft_swift_ext.core.contract`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from peft import AdaLoraModel, LoraModel, PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from ..compat import adapter_names_in
from ..core import files
from ..core.contract import InPlaceTuner, MergePolicy
from ..core.keys import Slot, adapter_tensors, tuner_modules
from ..core.lora_rows import install_row_hooks
from ..core.rows import BASE, adapter_rows, checked_row_names, merged_adapters
from ..core.tuner import SwiftBaseTuner
from . import composition, io, optim, trainability, whole_model
from .activation import ActivationState, install_view, per_thread_from_env
from .offload import OffloadStore


class SwiftTuners(nn.Module):
    """What ``PeftModel.base_model`` is for a :class:`SwiftModel`: the adapted model, run as it is.

    PEFT, transformers and TRL reach the plain model as ``peft_model.base_model.model``; attributes this module
    lacks come from that model, and calling it calls the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        """Run the adapted model (arguments as it takes them)."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class SwiftModel(PeftModel):
    """A model carrying any number of adapters, of PEFT's tuner types and this package's, at once.

    It is a ``PeftModel``, so the HF ``Trainer``, TRL and accelerate treat it as one: checkpoints hold only the
    adapters (SWIFT's layout), ``resume_from_checkpoint`` reloads them, and PEFT's methods keep their meaning
    (``set_adapter``, ``load_adapter``, ``get_nb_trainable_parameters``...; where a method concerns one tuner type,
    it acts on the adapter's own type and leaves the other types as they are). As in PEFT, ``base_model.model`` is
    the adapted model (:meth:`get_base_model`).

    Build it with :meth:`peft_swift_ext.Swift.prepare_model` or :meth:`peft_swift_ext.Swift.from_pretrained`.
    Calls and attributes it does not define go to the adapted model, so it runs ``forward`` and ``generate`` like
    the original.

    Args:
        model: the model to adapt (changed in place by the adapters' layers).
        per_thread: activation per thread; ``None`` reads SWIFT's ``USE_UNIQUE_THREAD`` (``0`` = per thread).
    """

    def __init__(self, model: nn.Module, per_thread: bool | None = None) -> None:
        # PeftModel.__init__ injects one adapter of one type; a SwiftModel starts empty and adds adapters of any type.
        nn.Module.__init__(self)
        if isinstance(model, PeftModel):
            raise TypeError(
                f"model is already a {type(model).__name__}; add adapters to a SwiftModel with Swift.prepare_model"
            )
        self.base_model = SwiftTuners(model)
        self.special_peft_forward_args = {"adapter_names", "alora_offsets"}
        self._is_prompt_learning = False
        self._peft_config = None
        self._adapters_disabled = False
        self.activation = ActivationState(per_thread_from_env() if per_thread is None else per_thread)
        #: the offloaded adapters' store (``set_active_adapters(..., offload=...)``)
        self.offload_store = OffloadStore()
        # Plain dicts, not submodules: the tuners share the adapted model, whose parameters must appear once.
        self._tuners: dict[PeftType, BaseTuner] = {}
        self._configs: dict[str, PeftConfig] = {}
        self._trainable: set[str] = set()
        self._layers: list[BaseTunerLayer] = []
        self._adapter_modules: list[tuple[str, nn.Module]] = []
        if getattr(model, "is_gradient_checkpointing", True):
            self.prepare_model_for_gradient_checkpointing(model)  # as PeftModel does: inputs get gradients

    # --- pass-through ------------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The adapted model (``base_model.model``, as in PEFT)."""
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        """The adapted model, with the adapters' layers in it (PEFT's meaning)."""
        return self.base_model.model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Run the adapted model with the active adapters (arguments as the adapted model takes them).

        Args:
            *args (Any): passed to the adapted model.
            adapter_names: one adapter name per row (``"__base__"``: no adapter): a mixed-adapter batch, each row
                computed as if only its adapter were active (inference only).
            **kwargs (Any): passed to the adapted model.
        """
        if torch.compiler.is_compiling() and adapter_names is None:
            # dynamo cannot trace the structure lock; a compiled forward runs the model as one graph and leaves
            # keeping adapters unchanged while it runs to the caller (as for any compiled module)
            return self.base_model.model(*args, **kwargs)
        with self.activation.structure.reading(), self._adapter_rows(adapter_names, args, kwargs):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The adapted model's ``generate``, with the active adapters, or one adapter per row.

        Args:
            *args (Any): passed to the adapted model's ``generate``.
            adapter_names: one adapter name per row of the batch (``"__base__"``: no adapter).
            **kwargs (Any): passed to the adapted model's ``generate``.
        """
        with self.activation.structure.reading(), self._adapter_rows(adapter_names, args, kwargs):
            return self.base_model.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _adapter_rows(self, adapter_names: list[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        """Inside the block, each row runs its own adapter: this package's layers read the rows, LoRA layers get
        hooks that add each row's adapter, and every layer's active set is empty for the call."""
        if adapter_names is None:
            yield
            return
        rows = checked_row_names(
            adapter_names, self._configs, self.model.training, merged_adapters(self.model), kwargs, args
        )
        in_place = sorted({name for name in rows if name in self._configs and self.in_place_tuner(name)})
        if in_place:
            raise ValueError(f"adapters {in_place} train the base weights in place; rows cannot select them")
        if BASE in rows:
            self._check_can_restore(self.adapters, "run rows on the base model alone ('__base__')")
        unsupported = sorted({name for name in rows if name in self._configs and not self._selectable_per_row(name)})
        if unsupported:
            kinds = {name: str(self._configs[name].peft_type) for name in unsupported}
            raise ValueError(
                f"adapter_names: per-row selection is not available for {kinds} (this package's tuners and "
                "LoRA-family adapters without DoRA support it)"
            )
        install_row_hooks(self.model)
        with self.activation.scoped(()), adapter_rows(rows):
            yield

    def _selectable_per_row(self, adapter_name: str) -> bool:
        tuner = self.tuner_for(self._configs[adapter_name].peft_type)
        if isinstance(tuner, LoraModel) and not isinstance(tuner, AdaLoraModel):
            return not getattr(self._configs[adapter_name], "use_dora", False)
        return isinstance(tuner, SwiftBaseTuner)

    # --- adapters ----------------------------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> config, in the order the adapters were added."""
        return dict(self._configs)

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, active or not, in the order the adapters were added."""
        return list(self._configs)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters active for the calling thread."""
        return list(self.activation.current())

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter (PEFT's name for the adapter a model runs), or None when none is active."""
        active = self.activation.current()
        return active[0] if active else None

    @property
    def peft_type(self) -> PeftType | None:
        """The tuner type of :attr:`active_adapter` (a SwiftModel may hold adapters of several types)."""
        name = self.active_adapter
        return None if name is None else PeftType(self._configs[name].peft_type)

    @contextlib.contextmanager
    def active_adapters_scope(self, *adapter_names: str) -> Iterator[None]:
        """Inside the block, the calling thread or asyncio task (and the tasks it starts) runs exactly these adapters.

        Other threads and tasks keep their own selection, so concurrent requests can each use their own
        adapters on one model. Nothing is moved or merged; offloaded adapters are refused.

        Args:
            *adapter_names: the adapters to run, in order (none: the base model alone).
        """
        self._check_known(adapter_names)
        offloaded = [name for name in adapter_names if self.offload_store.is_offloaded(name)]
        if offloaded:
            raise ValueError(f"adapters {offloaded} are offloaded; activate them before selecting them in a scope")
        with self.activation.scoped(adapter_names):
            yield

    @property
    def adapter_modules(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of every module holding per-adapter containers (cached between structure changes)."""
        return self._adapter_modules

    def tuner_for(self, peft_type: PeftType) -> BaseTuner | None:
        """The tuner of ``peft_type`` that holds this model's adapters of that type, or None.

        Args:
            peft_type: the tuner type.
        """
        return self._tuners.get(PeftType(peft_type))

    def in_place_tuner(self, adapter_name: str) -> InPlaceTuner | None:
        """The tuner of ``adapter_name`` if it trains base weights in place (LISA), else None.

        Args:
            adapter_name: a known adapter.
        """
        tuner = self.tuner_for(self._configs[adapter_name].peft_type)
        return tuner if isinstance(tuner, InPlaceTuner) else None

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        trainable: bool = True,
    ) -> None:
        """Inject a new adapter, inactive as in PEFT (activate it with :meth:`activate_adapter`); on any error the
        model is left as it was.

        Args:
            adapter_name: a new name, usable as a folder name.
            peft_config: any PEFT config registered in PEFT (PEFT's own methods and this package's).
            low_cpu_mem_usage: create its weights on the meta device (to be filled by a load).
            autocast_adapter_dtype: as in PEFT, float16/bfloat16 adapter weights are upcast to float32; False keeps
                the dtype they were made in (the base model's).
            trainable: whether its weights require grad.
        """
        files.check_adapter_name(adapter_name)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        with self.activation.structure.writing():
            composition.inject(
                self.model, self._tuners, adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype
            )
            self._configs[adapter_name] = peft_config
            if trainable and not peft_config.inference_mode:
                self._trainable.add(adapter_name)
            self.structure_changed()

    @contextlib.contextmanager
    def adding_adapters(self) -> Iterator[None]:
        """Adapters added inside the block are all removed again if the block raises (all or nothing)."""
        before = set(self._configs)
        try:
            yield
        except BaseException:
            for name in reversed([name for name in self._configs if name not in before]):
                self._remove_adapter(name)  # just added: nothing has trained, so no in-place refusal
            raise

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its layers; modules left without adapters get their original module back.

        Args:
            adapter_name: the adapter to remove.
        """
        self._check_known([adapter_name])
        self._check_can_restore([adapter_name], f"delete adapter {adapter_name!r}")
        self._remove_adapter(adapter_name)

    def _remove_adapter(self, adapter_name: str) -> None:
        with self.activation.structure.writing():
            self.offload_store.forget(adapter_name)
            composition.remove(
                self.model, self._tuners, adapter_name, PeftType(self._configs.pop(adapter_name).peft_type)
            )
            self._trainable.discard(adapter_name)
            self.activation.deactivate(adapter_name)
            self.structure_changed()

    def adapter_slots(self, adapter_name: str, loading: bool = False) -> dict[Slot, tuple[str, torch.Tensor]]:
        """Every tensor of one adapter: :class:`~peft_swift_ext.core.keys.Slot` -> (key in the model, tensor).

        For an in-place adapter (LISA) these are the base tensors it saves, keyed by their plain-model path
        (SWIFT layout, like ``modules_to_save`` copies) and mapped to their current key in the model (which may
        pass through other tuners' ``base_layer``).

        Args:
            adapter_name: a known adapter.
            loading: the slots a checkpoint may fill: for an in-place adapter also the base tensors it does not
                save yet (optional slots), since a resumed run's checkpoint holds what trained before.
        """
        tuner = self.in_place_tuner(adapter_name)
        if tuner is None:
            return adapter_tensors(self.model, adapter_name)
        current = {id(param): key for key, param in self.model.named_parameters(remove_duplicate=False)}
        saved = tuner.saved_tensors()
        tensors = tuner.loadable_tensors() if loading else saved
        return {
            Slot(path, "", "", named=False, required=path in saved): (current[id(param)], param)
            for path, param in tensors.items()
        }

    def _check_known(self, names: Iterable[str]) -> None:
        unknown = [name for name in names if name not in self._configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has: {self.adapters}")

    def structure_changed(self) -> None:
        """Re-derive everything that depends on which tuner layers exist, after adding or removing adapters."""
        install_view(self.model, self.activation)
        # cached so that switching and offloading adapters does not walk the whole module tree
        self._adapter_modules = tuner_modules(self.model)
        self._layers = [m for _, m in self._adapter_modules if isinstance(m, BaseTunerLayer)]
        trainability.refresh(self.model, self._trainable, self._in_place_adapters(), self._active_set())

    # --- tuners that train base weights in place (LISA) ----------------------------------------------------------

    def _in_place_adapters(self) -> list[tuple[str, InPlaceTuner]]:
        return [(name, tuner) for name in self._configs if (tuner := self.in_place_tuner(name)) is not None]

    def _active_set(self) -> set[str]:
        return set(self.activation.current())

    def _refresh_in_place_trainable(self) -> None:
        trainability.refresh_in_place(self._trainable, self._in_place_adapters(), self._active_set())

    def _check_can_restore(self, names: Iterable[str], action: str) -> None:
        """Refuse ``action`` on in-place adapters among ``names`` that have trained (before anything changes)."""
        for name in names:
            tuner = self.in_place_tuner(name) if name in self._configs else None
            if tuner is not None:
                tuner.check_can_restore(action)

    # --- activation --------------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter of its tuner type, as ``PeftModel.set_adapter`` does for that type.

        The named adapters train (unless ``inference_mode``); the other adapters of their types are deactivated
        and frozen. Adapters of other tuner types keep their state; :meth:`set_active_adapters` chooses the whole
        active set instead.

        Args:
            adapter_name: a name, or names of one or several types, activated in the given order.
            inference_mode: freeze the named adapters instead of making them trainable.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        types = {PeftType(self._configs[name].peft_type) for name in names}
        same_type = [name for name in self.adapters if PeftType(self._configs[name].peft_type) in types]
        kept = [name for name in self.active_adapters if name not in same_type]
        self._check_not_merged()
        self._check_can_restore([name for name in same_type if name not in names], "be deactivated")
        for name in names:
            self.offload_store.restore(self._adapter_modules, name)
        for name in same_type:
            if name in names and not inference_mode:
                self._trainable.add(name)
            else:
                self._trainable.discard(name)
        self.activation.set(kept + names)
        self.structure_changed()

    def set_active_adapters(self, adapter_names: str | Iterable[str], offload: str | None = None) -> None:
        """Make exactly ``adapter_names`` active; the others are deactivated (and offloaded if asked).

        Args:
            adapter_names: a name or names, activated in the given order.
            offload: ``None`` keeps inactive adapters in place, ``'cpu'`` or ``'meta'`` moves them away.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        self._check_offload_allowed(offload)
        self._check_not_merged()
        others = [name for name in self.adapters if name not in names]
        self._check_can_restore(others, "be deactivated")
        if offload is not None:
            for name in others:  # all refusals before any change
                self.offload_store.check(self._adapter_modules, name, offload)
            for name in others:
                self.offload_store.offload(self._adapter_modules, name, offload)
        for name in names:
            self.offload_store.restore(self._adapter_modules, name)
        self.activation.set(names)
        self._refresh_in_place_trainable()

    def activate_adapter(self, adapter_name: str) -> None:
        """Activate one adapter (restoring it if it was offloaded), keeping the others as they are.

        Args:
            adapter_name: the adapter to activate (for the calling thread in per-thread mode).
        """
        self._check_known([adapter_name])
        self._check_not_merged()
        self.offload_store.restore(self._adapter_modules, adapter_name)
        self.activation.activate(adapter_name)
        self._refresh_in_place_trainable()

    def deactivate_adapter(self, adapter_name: str, offload: str | None = None) -> None:
        """Deactivate one adapter, optionally moving its weights away.

        Args:
            adapter_name: the adapter to deactivate.
            offload: ``None`` keeps its weights in place; ``'cpu'`` or ``'meta'`` frees the memory they hold.
        """
        self._check_known([adapter_name])
        self._check_offload_allowed(offload)
        self._check_not_merged()
        action = "be deactivated" if offload is None else f"be offloaded to {offload!r}"
        self._check_can_restore([adapter_name], action)
        if offload is not None:
            self.offload_store.check(self._adapter_modules, adapter_name, offload)
        self.activation.deactivate(adapter_name)
        if offload is not None:
            self.offload_store.offload(self._adapter_modules, adapter_name, offload)
        self._refresh_in_place_trainable()

    def _check_offload_allowed(self, offload: str | None) -> None:
        if offload is not None and self.activation.per_thread:
            raise ValueError(
                "offload is refused with USE_UNIQUE_THREAD=0: other threads may be using the adapter; "
                "deactivate without offload"
            )

    def _check_not_merged(self) -> None:
        merged = sorted({n for m in self._layers for n in m.merged_adapters})
        if merged:
            raise ValueError(f"adapters {merged} are merged into the base weights; call unmerge() before switching")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; the adapters active before are restored after it."""
        self._check_can_restore(self.adapters, "run the base model alone (disable_adapter)")
        previous = self.activation.current()
        self.activation.set(())
        try:
            yield
        finally:
            self.activation.set(previous)

    # --- merging -----------------------------------------------------------------------------------------------

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights, keeping their layers (undo with :meth:`unmerge`).

        Raises before changing anything if an adapter's tuner cannot merge, activation is per thread, or merging
        would put an adapter below another active one it wraps (see :func:`.composition.check_merge_keeps_outputs`).

        Args:
            adapter_names: the adapters to merge; the active ones by default.
            safe_merge: check the merged weights for NaNs before writing them (PEFT's option).
        """
        if self.activation.per_thread:
            raise ValueError("merging is refused with USE_UNIQUE_THREAD=0: it would change every thread's model")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_known(names)
        for name in names:
            tuner = self.tuner_for(self._configs[name].peft_type)
            if isinstance(tuner, MergePolicy) and not tuner.mergeable:
                raise ValueError(
                    f"adapter {name!r} ({self._configs[name].peft_type}) cannot be merged into the base model; "
                    "deactivate it or pass adapter_names without it"
                )
            if self.offload_store.is_offloaded(name):
                raise ValueError(f"adapter {name!r} is offloaded; activate it before merging")
        composition.check_merge_keeps_outputs(self.base_model, names, self._active_set())
        for layer in self._layers:
            owned = [name for name in names if name in adapter_names_in(layer)]
            if owned:
                layer.merge(safe_merge=safe_merge, adapter_names=owned)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for layer in self._layers:
            while layer.merged:
                layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Merge adapters, remove every adapter layer and return the plain model.

        Args:
            adapter_names: the adapters to merge; the active ones by default (others are dropped).
            safe_merge: check the merged weights for NaNs before writing them.
        """
        self.merge(adapter_names, safe_merge=safe_merge)
        return self._unload(merged=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        self._check_can_restore(self.adapters, "unload() back to the original model")
        self.unmerge()
        return self._unload(merged=False)

    def _unload(self, merged: bool) -> nn.Module:
        with self.activation.structure.writing():
            composition.unwrap_all(self.model, self._tuners, merged)
        self._layers = []
        self._adapter_modules = []
        self._configs.clear()
        self._trainable.clear()
        self.activation.set(())
        return self.model

    # --- training helpers ----------------------------------------------------------------------------------------

    def get_trainable_parameters(self) -> str:
        """SWIFT's one-line summary of trainable parameters and memory in use."""
        return trainability.summary(self.model)

    def create_optimizer_param_groups(self, **defaults) -> list[dict]:
        """Optimizer parameter groups: LoRA+ groups for LoRA+ adapters, then decay / no-decay groups.

        Args:
            **defaults (Any): group defaults such as ``lr`` and ``weight_decay``; LoRA+ groups need ``lr``.
        """
        in_place = [tuner for name, tuner in self._in_place_adapters() if name in self._trainable]
        return optim.param_groups(self.model, self._configs, in_place, **defaults)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
        """PEFT's LoRA combination (``linear``, ``cat``, ``svd``, ``ties``, ``dare_*``...) of adapters here.

        The adapters must be of one type, LoRA or LoRA+ (the result has that type); the new adapter becomes the
        only active one.

        Args:
            adapters: names of the LoRA (or LoRA+) adapters to combine.
            weights: one weight per adapter.
            adapter_name: name of the new adapter.
            **kwargs (Any): passed to ``LoraModel.add_weighted_adapter`` (``combination_type``, ``density``...).
        """
        files.check_adapter_name(adapter_name)
        self._check_known(adapters)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        types = {PeftType(self._configs[name].peft_type) for name in adapters}
        if len(types) != 1 or not types <= {PeftType.LORA, PeftType.LORAPLUS}:
            kinds = {name: str(self._configs[name].peft_type) for name in adapters}
            raise ValueError(f"add_weighted_adapter combines adapters of one type, LoRA or LoRA+; got {kinds}")
        self._check_can_restore(self.adapters, "be deactivated (add_weighted_adapter activates only the new adapter)")
        tuner = self._tuners[types.pop()]
        with self.activation.structure.writing():
            tuner.add_weighted_adapter(adapters, weights, adapter_name, **kwargs)
            self._configs[adapter_name] = tuner.peft_config[adapter_name]
            self.structure_changed()
        self.activation.set([adapter_name])
        self._refresh_in_place_trainable()

    # --- saving and loading --------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        *,
        adapter_name: str | list[str] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write each adapter to ``save_directory/<adapter>/`` in SWIFT's layout, atomically.

        The signature is ``PeftModel.save_pretrained``'s (the HF ``Trainer`` calls it), plus SWIFT's ``adapter_name``.

        Args:
            save_directory: the checkpoint folder (created if needed; other content is kept).
            safe_serialization: safetensors (default) or a torch pickle of plain tensors.
            selected_adapters: PEFT's name for ``adapter_name``: the adapters to write (all by default).
            save_embedding_layers: PEFT's option to also write resized embedding layers; this model saves
                what its adapters train (``modules_to_save`` copies included), so only ``"auto"`` and False are
                accepted.
            is_main_process: False writes nothing (the other ranks of a distributed run).
            adapter_name: SWIFT's name for ``selected_adapters``: one name or several.
            state_dict: the model's full state dict to take the tensors from (what the ``Trainer`` passes
                when DeepSpeed ZeRO-3 or FSDP gathered it), instead of the live parameters.
        """
        if save_embedding_layers not in ("auto", False):
            raise ValueError(
                f"save_embedding_layers={save_embedding_layers!r}: a SwiftModel saves exactly what its adapters hold; "
                "train the embeddings as modules_to_save (or with a tuner that does) to save them"
            )
        if selected_adapters is not None and adapter_name is not None:
            raise ValueError("pass selected_adapters (PEFT's name) or adapter_name (SWIFT's), not both")
        chosen = adapter_name if adapter_name is not None else selected_adapters
        requested = self.adapters if chosen is None else [chosen] if isinstance(chosen, str) else list(chosen)
        self._check_known(requested)
        if not is_main_process:
            return
        names = [name for name in self.adapters if name in requested]  # the order they were added in
        io.save(self, save_directory, names, safe_serialization, state_dict)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """PEFT's ``load_adapter``: load one adapter's folder into ``adapter_name``.

        Into an existing adapter (what the HF ``Trainer`` does on ``resume_from_checkpoint``) only the weights are
        loaded, after checking that the folder holds an adapter of the same type with the same keys and shapes; its
        activation and trainability stay as they are. A new adapter is added inactive, as in PEFT. The folder is a
        PEFT-layout adapter, one adapter sub-folder of a SWIFT-layout checkpoint, or an ms-swift one. A Trainer
        checkpoint of a SwiftModel must hold every adapter of this model; a failed load changes nothing.

        Args:
            model_id: the adapter's folder (local only).
            adapter_name: the adapter to load into, or a new adapter's name.
            is_trainable: for a new adapter, whether it trains (an existing one keeps its trainability, as in PEFT).
            torch_device: the device to read the tensors onto first (they end on the adapter's own device).
            autocast_adapter_dtype: for a new adapter, PEFT's float32 upcast of float16/bfloat16 weights.
            low_cpu_mem_usage: for a new adapter, create it on the meta device and assign the loaded tensors.
        """
        io.load_adapter(
            self, Path(model_id), adapter_name, is_trainable, torch_device, autocast_adapter_dtype, low_cpu_mem_usage
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str | list[str] | dict[str, str] | None = None,
        is_trainable: bool = False,
        *,
        per_thread: bool | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> SwiftModel:
        """Load every adapter of a checkpoint folder (SWIFT's, PEFT's or ms-swift's layout) onto ``model``.

        Args:
            model: a plain model, or a SwiftModel to add the adapters to.
            model_id: the local checkpoint folder.
            adapter_name: ``None`` loads every adapter; a name or list selects; a dict renames
                ``{saved name: new name}``.
            is_trainable: whether the loaded adapters train.
            per_thread: activation per thread for a new SwiftModel (``None``: SWIFT's ``USE_UNIQUE_THREAD``).
            low_cpu_mem_usage: create the adapters on the meta device and assign the loaded tensors.
        """
        swift_model = model if isinstance(model, SwiftModel) else cls(model, per_thread)
        io.load_into(swift_model, Path(model_id), adapter_name, is_trainable, low_cpu_mem_usage)
        return swift_model

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a plain base model's state dict (keys as the model had before any
        adapter) is checked whole and copied into the base weights.

        That is what the Hugging Face ``Trainer`` passes when it resumes a checkpoint holding the whole base model
        (full fine-tuning beside NEFTune): it reads the root's ``model.safetensors`` itself, so the adapter folders
        beside it are not read; a model whose adapters hold weights is then refused by name instead of resuming
        with untrained adapters.

        Args:
            state_dict: the tensors to load.
            strict: as in ``torch.nn.Module.load_state_dict`` (a whole base model is always checked strictly).
            assign: as in ``torch.nn.Module.load_state_dict``.
        """
        if not whole_model.is_base_state(self, state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        weighted = [name for name in self.adapters if self.adapter_state_dict(name)]
        if weighted:
            raise ValueError(
                f"the state dict holds the base model alone (a checkpoint with the whole model at its root, which the "
                f"Trainer reads by itself on resume), but adapters {weighted} have weights it does not hold; load the "
                "checkpoint folder with model.load_adapter(folder) or Swift.from_pretrained(base, folder)"
            )
        whole_model.check(self, state_dict, Path("the state dict"))
        whole_model.load(self, state_dict)
        return nn.modules.module._IncompatibleKeys([], [])

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors under SWIFT-layout keys (the adapter name kept), read back if offloaded.

        Args:
            adapter_name: the adapter to read.
        """
        self._check_known([adapter_name])
        return io.adapter_state_dict(self, adapter_name)

    def load_adapter_weights(
        self, adapter_name: str, weights: dict[str, torch.Tensor], source: str, saved_as: str, assign: bool = False
    ) -> None:
        """Copy a checkpoint's tensors into adapter ``adapter_name``, checking keys and shapes first.

        Args:
            adapter_name: the adapter (already injected) to fill.
            weights: the checkpoint's tensors, in SWIFT layout (keys with ``saved_as``) or PEFT layout
                (``base_model.model.`` keys without adapter name).
            source: the file, for error messages.
            saved_as: the adapter name the checkpoint was saved under.
            assign: replace the (meta) tensors instead of copying into them.
        """
        io.load_adapter_weights(self, adapter_name, weights, source, saved_as, assign)
