"""``SwiftModel``: several adapters of different tuner types on one model, each switchable on its own.

PEFT's ``PeftModel`` holds adapters of one type and ``PeftMixedModel`` only a fixed list of built-in types,
so the composition lives here. The work is done in the modules beside this one — injection and removal
(:mod:`.composition`), activation (:mod:`.activation`), offload (:mod:`.offload`), trainability
(:mod:`.trainability`), checkpoints (:mod:`.io`), optimizer groups (:mod:`.optim`) — through the per-adapter
containers every tuner layer shares (:mod:`peft_swift_ext.core.keys`) and the tuner protocols of
:mod:`peft_swift_ext.core.contract`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from ..compat import adapter_names_in
from ..core import files
from ..core.contract import InPlaceTuner, MergePolicy
from ..core.keys import Slot, adapter_tensors, tuner_modules
from . import composition, io, optim, trainability
from .activation import ActivationState, install_view, per_thread_from_env
from .offload import OffloadStore


class SwiftModel(nn.Module):
    """A model carrying any number of adapters, of PEFT's tuner types and this package's, at once.

    Build it with :meth:`peft_swift_ext.Swift.prepare_model` or :meth:`peft_swift_ext.Swift.from_pretrained`.
    Calls and attributes it does not define go to the wrapped model, so it runs ``forward`` and
    ``generate`` like the original.

    Args:
        model: the model to adapt (changed in place by the adapters' layers).
        per_thread: activation per thread; ``None`` reads SWIFT's ``USE_UNIQUE_THREAD`` (``0`` = per thread).
    """

    def __init__(self, model: nn.Module, per_thread: bool | None = None) -> None:
        super().__init__()
        if isinstance(model, SwiftModel):
            raise TypeError("model is already a SwiftModel; add adapters to it with Swift.prepare_model")
        self.base_model = model
        self.activation = ActivationState(per_thread_from_env() if per_thread is None else per_thread)
        #: the offloaded adapters' store (``set_active_adapters(..., offload=...)``)
        self.offload_store = OffloadStore()
        # Plain dicts, not submodules: the tuners share base_model, whose parameters must appear once.
        self._tuners: dict[PeftType, BaseTuner] = {}
        self._configs: dict[str, PeftConfig] = {}
        self._trainable: set[str] = set()
        self._layers: list[BaseTunerLayer] = []
        self._adapter_modules: list[tuple[str, nn.Module]] = []
        # The HF Trainer and TRL choose dataset columns from forward's signature: expose the wrapped model's.
        self.forward = functools.update_wrapper(functools.partial(SwiftModel.forward, self), model.forward)

    # --- pass-through ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the wrapped model with the active adapters (arguments as the wrapped model takes them)."""
        with self.activation.structure.reading():  # never on layers another thread is changing
            return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``, with the active adapters.

        Args:
            *args (Any): passed to the wrapped model's ``generate``.
            **kwargs (Any): passed to the wrapped model's ``generate``.
        """
        with self.activation.structure.reading():
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

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
        self, adapter_name: str, config: PeftConfig, *, trainable: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        """Inject a new adapter and activate it; on any error the model is left as it was.

        Args:
            adapter_name: a new name, usable as a folder name.
            config: any PEFT config registered in PEFT (PEFT's own methods and this package's).
            trainable: whether its weights require grad.
            low_cpu_mem_usage: create its weights on the meta device (to be filled by a load).
        """
        files.check_adapter_name(adapter_name)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        with self.activation.structure.writing():
            composition.inject(self.base_model, self._tuners, adapter_name, config, low_cpu_mem_usage)
            self._configs[adapter_name] = config
            if trainable and not config.inference_mode:
                self._trainable.add(adapter_name)
            self.structure_changed()
            self.activation.activate(adapter_name)
            self._refresh_in_place_trainable()

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
                self.base_model, self._tuners, adapter_name, PeftType(self._configs.pop(adapter_name).peft_type)
            )
            self._trainable.discard(adapter_name)
            self.activation.deactivate(adapter_name)
            self.structure_changed()

    def adapter_slots(self, adapter_name: str) -> dict[Slot, tuple[str, torch.Tensor]]:
        """Every tensor of one adapter: :class:`~peft_swift_ext.core.keys.Slot` -> (key in the model, tensor).

        For an in-place adapter (LISA) these are the base tensors it saves, keyed by their plain-model path
        (SWIFT layout, like ``modules_to_save`` copies) and mapped to their current key in the model (which may
        pass through other tuners' ``base_layer``).

        Args:
            adapter_name: a known adapter.
        """
        tuner = self.in_place_tuner(adapter_name)
        if tuner is None:
            return adapter_tensors(self.base_model, adapter_name)
        current = {id(param): key for key, param in self.base_model.named_parameters(remove_duplicate=False)}
        return {
            Slot(path, "", "", named=False): (current[id(param)], param)
            for path, param in tuner.saved_tensors().items()
        }

    def _check_known(self, names: Iterable[str]) -> None:
        unknown = [name for name in names if name not in self._configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has: {self.adapters}")

    def structure_changed(self) -> None:
        """Re-derive everything that depends on which tuner layers exist, after adding or removing adapters."""
        install_view(self.base_model, self.activation)
        # cached so that switching and offloading adapters does not walk the whole module tree
        self._adapter_modules = tuner_modules(self.base_model)
        self._layers = [m for _, m in self._adapter_modules if isinstance(m, BaseTunerLayer)]
        trainability.refresh(self.base_model, self._trainable, self._in_place_adapters(), self._active_set())

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
        self._check_can_restore([n for n in self.adapters if n not in names], "be deactivated")
        if offload is not None:
            for name in self.adapters:
                if name not in names:  # all refusals before any change
                    self.offload_store.check(self._adapter_modules, name, offload)
        for name in self.adapters:
            if name not in names and offload is not None:
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

        Raises before changing anything if an adapter's tuner cannot merge or activation is per thread.

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
            composition.unwrap_all(self.base_model, self._tuners, merged)
        self._layers = []
        self._adapter_modules = []
        self._configs.clear()
        self._trainable.clear()
        self.activation.set(())
        return self.base_model

    # --- training helpers ----------------------------------------------------------------------------------------

    def get_trainable_parameters(self) -> str:
        """SWIFT's one-line summary of trainable parameters and memory in use."""
        return trainability.summary(self.base_model)

    def print_trainable_parameters(self) -> None:
        """Print :meth:`get_trainable_parameters` (PEFT's name for it)."""
        print(self.get_trainable_parameters())

    def create_optimizer_param_groups(self, **defaults) -> list[dict]:
        """Optimizer parameter groups: LoRA+ groups for LoRA+ adapters, then decay / no-decay groups.

        Args:
            **defaults (Any): group defaults such as ``lr`` and ``weight_decay``; LoRA+ groups need ``lr``.
        """
        in_place = [tuner for name, tuner in self._in_place_adapters() if name in self._trainable]
        return optim.param_groups(self.base_model, self._configs, in_place, **defaults)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
        """PEFT's LoRA combination (``linear``, ``cat``, ``svd``, ``ties``, ``dare_*``...) of adapters here.

        The new adapter becomes the only active one.

        Args:
            adapters: names of the LoRA adapters to combine.
            weights: one weight per adapter.
            adapter_name: name of the new adapter.
            **kwargs (Any): passed to ``LoraModel.add_weighted_adapter`` (``combination_type``, ``density``...).
        """
        files.check_adapter_name(adapter_name)
        self._check_known(adapters)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        not_lora = [name for name in adapters if PeftType(self._configs[name].peft_type) != PeftType.LORA]
        if not_lora:
            raise ValueError(f"add_weighted_adapter combines LoRA adapters only; not LoRA: {not_lora}")
        self._check_can_restore(self.adapters, "be deactivated (add_weighted_adapter activates only the new adapter)")
        tuner = self._tuners[PeftType.LORA]
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
        adapter_name: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        """Write each adapter to ``save_directory/<adapter>/`` in SWIFT's layout, atomically.

        Args:
            save_directory: the checkpoint folder (created if needed; other content is kept).
            safe_serialization: safetensors (default) or a torch pickle of plain tensors.
            adapter_name: one name or several; all adapters by default.
            **kwargs (Any): accepted for callers that pass ``PeftModel.save_pretrained`` options (the HF
                ``Trainer``); ignored.
        """
        if adapter_name is None:
            requested = self.adapters
        else:
            requested = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(requested)
        names = [name for name in self.adapters if name in requested]  # the order they were added in
        io.save(self, save_directory, names, safe_serialization)

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
