"""``SwiftModel``: several adapters of different tuner types on one model, each switchable on its own.

PEFT's ``PeftModel`` holds adapters of one type and ``PeftMixedModel`` only a fixed list of built-in
types, so the composition lives here. Each tuner type gets one PEFT ``BaseTuner`` instance that injects
its layers into the shared base model; activation, offload, trainability, saving and loading are done
here once for every type, through the per-adapter containers that all tuner layers share (see
:mod:`peft_swift_ext.swift.keys`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from ..distributed import full_numel
from ..tuners.base import find_target_modules
from . import checkpoint
from .activation import ActivationState, install_view, per_thread_from_env
from .keys import PEFT_KEY_PREFIX, Slot, adapter_tensors, tuner_modules
from .offload import OffloadStore

_NO_DECAY = re.compile(r"(^|\.)(bias|[^.]*norm[^.]*\.weight|[^.]*ln[^.]*\.weight)$", re.IGNORECASE)


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
        # Plain dicts, not submodules: the tuners share base_model, whose parameters must appear once.
        self._tuners: dict[PeftType, BaseTuner] = {}
        self._configs: dict[str, PeftConfig] = {}
        self._trainable: set[str] = set()
        self._offload = OffloadStore()
        self._layers: list[BaseTunerLayer] = []
        self._adapter_modules: list[tuple[str, nn.Module]] = []
        # The HF Trainer and TRL choose dataset columns from forward's signature: expose the wrapped model's.
        self.forward = functools.update_wrapper(functools.partial(SwiftModel.forward, self), model.forward)

    # --- pass-through ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """Run the wrapped model with the active adapters (arguments as the wrapped model takes them)."""
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``, with the active adapters.

        Args:
            *args (Any): passed to the wrapped model's ``generate``.
            **kwargs (Any): passed to the wrapped model's ``generate``.
        """
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
        checkpoint.check_adapter_name(adapter_name)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        if not isinstance(config, PeftConfig):
            raise TypeError(f"config for {adapter_name!r} must be a PeftConfig, got {type(config).__name__}")
        peft_type = PeftType(config.peft_type)
        if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
            raise ValueError(f"{type(config).__name__} ({peft_type.value}) is not an injectable tuner type")
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        had_peft_config = hasattr(self.base_model, "peft_config")
        try:
            with self._other_tuners_hidden(tuner_cls.tuner_layer_cls):
                targets = getattr(config, "target_modules", None)
                if isinstance(targets, (list, tuple, set)) or (isinstance(targets, str) and targets != "all-linear"):
                    find_target_modules(self.base_model, config)
                tuner = self._tuners.get(peft_type)
                if tuner is None:
                    self._tuners[peft_type] = tuner_cls(
                        self.base_model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
                    )
                else:
                    tuner.peft_config[adapter_name] = config
                    tuner.inject_adapter(self.base_model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            self._remove_layers_of(adapter_name, peft_type)
            raise
        finally:
            if not had_peft_config and hasattr(self.base_model, "peft_config"):
                del self.base_model.peft_config
        self._configs[adapter_name] = config
        if trainable and not config.inference_mode:
            self._trainable.add(adapter_name)
        self._structure_changed()
        self.activation.activate(adapter_name)
        self._refresh_in_place_trainable()

    @contextlib.contextmanager
    def _other_tuners_hidden(self, keep: type) -> Iterator[None]:
        """Take other tuner types' wrappers out of the module tree for the duration of an injection.

        PEFT never injects below an existing tuner layer, and names below a wrapper gain a ``base_layer``
        segment; with the wrappers out, every module sits at its original path. On exit each wrapper goes
        back around whatever now occupies its place (possibly the new tuner's own layer).
        """
        hidden: list[tuple[str, str, BaseTunerLayer]] = []
        while True:
            found = next(
                (
                    (path, module)
                    for path, module in self.base_model.named_modules()
                    if isinstance(module, BaseTunerLayer) and not isinstance(module, keep)
                ),
                None,
            )
            if found is None:
                break
            path, wrapper = found
            parent, child = _parent_of(self.base_model, path)
            setattr(parent, child, wrapper.base_layer)
            hidden.append((path, child, wrapper))
        try:
            yield
        finally:
            for path, child, wrapper in reversed(hidden):
                parent, _ = _parent_of(self.base_model, path)
                wrapper.base_layer = getattr(parent, child)
                setattr(parent, child, wrapper)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its layers; modules left without adapters get their original module back.

        Args:
            adapter_name: the adapter to remove.
        """
        self._check_known([adapter_name])
        self._check_can_restore([adapter_name], f"delete adapter {adapter_name!r}")
        self._delete_adapter(adapter_name)

    def _delete_adapter(self, adapter_name: str) -> None:
        """``delete_adapter`` without the in-place refusal: for rolling back an adapter that was just added."""
        self._offload.forget(adapter_name)
        self._remove_layers_of(adapter_name, PeftType(self._configs.pop(adapter_name).peft_type))
        self._trainable.discard(adapter_name)
        self.activation.deactivate(adapter_name)
        self._structure_changed()

    def _remove_layers_of(self, adapter_name: str, peft_type: PeftType) -> None:
        tuner = self._tuners.get(peft_type)
        if tuner is None:
            return
        tuner.peft_config.pop(adapter_name, None)
        for module in list(self.base_model.modules()):
            if isinstance(module, BaseTunerLayer) and adapter_name in module._all_available_adapter_names():
                module.delete_adapter(adapter_name)
            elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in module._adapters:
                module.delete_adapter(adapter_name, new_active_adapters=[])
        remove_structures = getattr(tuner, "remove_adapter_structures", None)
        if remove_structures is not None:
            remove_structures(adapter_name)
        _unwrap_empty_layers(self.base_model)
        if not tuner.peft_config:
            del self._tuners[peft_type]

    def _adapter_tensors(self, adapter_name: str) -> dict[Slot, tuple[str, torch.Tensor]]:
        """``adapter_tensors`` of one adapter, including the base tensors an in-place tuner (LISA) saves.

        Those are keyed by their plain-model path (SWIFT layout, like ``modules_to_save`` copies), and map to
        their current key in the model (which may pass through other tuners' ``base_layer``).
        """
        tuner = self._in_place_tuner(adapter_name)
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

    def _structure_changed(self) -> None:
        """Re-derive everything that depends on which tuner layers exist, after adding or removing adapters."""
        install_view(self.base_model, self.activation)
        # cached so that switching and offloading adapters does not walk the whole module tree
        self._adapter_modules = tuner_modules(self.base_model)
        self._layers = [m for _, m in self._adapter_modules if isinstance(m, BaseTunerLayer)]
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        for param in self.base_model.parameters():
            param.requires_grad = False
        for name in self._trainable:
            for slot, (_, tensor) in adapter_tensors(self.base_model, name).items():
                if slot.required and isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                    tensor.requires_grad = True
        for module in self.base_model.modules():
            # looked up on the class: wrappers forward unknown attributes to the modules they wrap
            if isinstance(module, BaseTunerLayer) and hasattr(type(module), "_freeze_non_trainable_peft_weights"):
                module._freeze_non_trainable_peft_weights()
        self._refresh_in_place_trainable()

    # --- tuners that train base weights in place (LISA) ----------------------------------------------------------
    # Such a tuner has no tuner layers: it names the base tensors it trains and saves itself (``saved_tensors``,
    # ``trainable_parameters``) and says when it can no longer be switched off (``check_can_restore``).

    def _in_place_tuner(self, adapter_name: str) -> BaseTuner | None:
        tuner = self._tuners.get(PeftType(self._configs[adapter_name].peft_type))
        return tuner if hasattr(tuner, "saved_tensors") else None

    def _in_place_adapters(self) -> list[tuple[str, BaseTuner]]:
        return [(name, tuner) for name in self._configs if (tuner := self._in_place_tuner(name)) is not None]

    def _refresh_in_place_trainable(self) -> None:
        """Make the base tensors that in-place tuners train trainable again, for trainable, active adapters.

        An inactive in-place adapter trains nothing (it can only be inactive before it has trained).
        """
        active = set(self.activation.current())
        for name, tuner in self._in_place_adapters():
            on = name in self._trainable and name in active
            for param in tuner.trainable_parameters():
                param.requires_grad = on

    def _check_can_restore(self, names: Iterable[str], action: str) -> None:
        """Refuse ``action`` on in-place adapters among ``names`` that have trained (before anything changes)."""
        for name in names:
            tuner = self._in_place_tuner(name) if name in self._configs else None
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
                    self._offload.check(self._adapter_modules, name, offload)
        for name in self.adapters:
            if name not in names and offload is not None:
                self._offload.offload(self._adapter_modules, name, offload)
        for name in names:
            self._offload.restore(self._adapter_modules, name)
        self.activation.set(names)
        self._refresh_in_place_trainable()

    def activate_adapter(self, adapter_name: str) -> None:
        """Activate one adapter (restoring it if it was offloaded), keeping the others as they are.

        Args:
            adapter_name: the adapter to activate (for the calling thread in per-thread mode).
        """
        self._check_known([adapter_name])
        self._check_not_merged()
        self._offload.restore(self._adapter_modules, adapter_name)
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
            self._offload.check(self._adapter_modules, adapter_name, offload)
        self.activation.deactivate(adapter_name)
        if offload is not None:
            self._offload.offload(self._adapter_modules, adapter_name, offload)
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
            tuner = self._tuners[PeftType(self._configs[name].peft_type)]
            if not getattr(tuner, "mergeable", True):
                raise ValueError(
                    f"adapter {name!r} ({self._configs[name].peft_type}) cannot be merged into the base model; "
                    "deactivate it or pass adapter_names without it"
                )
            if self._offload.is_offloaded(name):
                raise ValueError(f"adapter {name!r} is offloaded; activate it before merging")
        for layer in self._layers:
            owned = [name for name in names if name in layer._all_available_adapter_names()]
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
        for tuner in self._tuners.values():
            finalize = getattr(tuner, "finalize_unload", None)
            if finalize is not None:
                finalize(merged)
        _unwrap_all(self.base_model, merged)
        self._tuners.clear()
        self._layers = []
        self._adapter_modules = []
        self._configs.clear()
        self._trainable.clear()
        self.activation.set(())
        return self.base_model

    # --- training helpers ----------------------------------------------------------------------------------------

    def get_trainable_parameters(self) -> str:
        """SWIFT's one-line summary of trainable parameters and memory in use."""
        seen: set[int] = set()
        trainable = total = 0
        for param in self.base_model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            # sharded parameters (FSDP2 DTensor, ZeRO-3) count their full size
            numel = full_numel(param)
            total += numel
            trainable += numel if param.requires_grad else 0
        percent = 100 * trainable / total if total else 0.0
        label, gib = _memory_in_use()
        return (
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f} || "
            f"{label}: {gib:.2f}GiB."
        )

    def print_trainable_parameters(self) -> None:
        """Print :meth:`get_trainable_parameters` (PEFT's name for it)."""
        print(self.get_trainable_parameters())

    def create_optimizer_param_groups(self, **defaults) -> list[dict]:
        """Optimizer parameter groups: LoRA+ groups for LoRA+ adapters, then decay / no-decay groups.

        Args:
            **defaults (Any): group defaults such as ``lr`` and ``weight_decay``; LoRA+ groups need ``lr``.
        """
        from ..tuners.lora_plus.optim import lora_plus_group_of

        lr = defaults.get("lr")
        weight_decay = defaults.get("weight_decay", 0.0)
        groups: dict[str, dict] = {}
        owner: dict[int, str] = {}

        def claim(group_key: str, param: nn.Parameter, **options) -> None:
            if id(param) in owner:
                raise ValueError(f"a parameter is claimed by both '{owner[id(param)]}' and '{group_key}' groups")
            owner[id(param)] = group_key
            groups.setdefault(group_key, {**defaults, **options, "params": []})["params"].append(param)

        for name in self.adapters:
            config = self._configs[name]
            for slot, (key, tensor) in adapter_tensors(self.base_model, name).items():
                if not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
                    continue
                lora_plus = lora_plus_group_of(config, slot.attr, tensor, lr, weight_decay)
                if lora_plus is not None:
                    group_key, options = lora_plus
                    claim(f"{group_key}:{name}", tensor, **options)
                else:
                    decay = _NO_DECAY.search(key) is None and tensor.ndim > 1
                    claim("decay" if decay else "no_decay", tensor, weight_decay=weight_decay if decay else 0.0)
        # every layer an in-place tuner may draw (LISA), trainable now or not: the optimizer must hold them all
        candidates = {
            id(param)
            for name, tuner in self._in_place_adapters()
            if name in self._trainable
            for param in tuner.trainable_parameters(all_candidates=True)
        }
        for key, param in self.base_model.named_parameters():
            if (param.requires_grad or id(param) in candidates) and id(param) not in owner:
                decay = _NO_DECAY.search(key) is None and param.ndim > 1
                claim("decay" if decay else "no_decay", param, weight_decay=weight_decay if decay else 0.0)
        return list(groups.values())

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
        """PEFT's LoRA combination (``linear``, ``cat``, ``svd``, ``ties``, ``dare_*``...) of adapters here.

        The new adapter becomes the only active one.

        Args:
            adapters: names of the LoRA adapters to combine.
            weights: one weight per adapter.
            adapter_name: name of the new adapter.
            **kwargs (Any): passed to ``LoraModel.add_weighted_adapter`` (``combination_type``, ``density``...).
        """
        checkpoint.check_adapter_name(adapter_name)
        self._check_known(adapters)
        if adapter_name in self._configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {self.adapters}")
        not_lora = [name for name in adapters if PeftType(self._configs[name].peft_type) != PeftType.LORA]
        if not_lora:
            raise ValueError(f"add_weighted_adapter combines LoRA adapters only; not LoRA: {not_lora}")
        self._check_can_restore(self.adapters, "be deactivated (add_weighted_adapter activates only the new adapter)")
        tuner = self._tuners[PeftType.LORA]
        tuner.add_weighted_adapter(adapters, weights, adapter_name, **kwargs)
        self._configs[adapter_name] = tuner.peft_config[adapter_name]
        self._structure_changed()
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
        names = (
            self.adapters
            if adapter_name is None
            else [adapter_name]
            if isinstance(adapter_name, str)
            else list(adapter_name)
        )
        self._check_known(names)
        root = Path(save_directory)
        with checkpoint.staging_directory(root) as staging:
            for name in names:
                folder = staging / checkpoint.check_adapter_name(name)
                folder.mkdir()
                config = self._configs[name].to_dict()
                checkpoint.write_adapter_files(folder, config, self.adapter_state_dict(name), safe_serialization)
            # the order matters where adapters share a layer (DoRA normalises what precedes it)
            marker = staging / checkpoint.ROOT_MARKER
            marker.write_text(json.dumps({"adapter_order": self._save_order(names)}))
            root.mkdir(parents=True, exist_ok=True)
            checkpoint.replace_paths(
                [(staging / name, root / name) for name in names] + [(marker, root / marker.name)]
            )

    def _save_order(self, names: list[str]) -> list[str]:
        active = [name for name in self.active_adapters if name in names]
        return active + [name for name in names if name not in active]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One adapter's tensors under SWIFT-layout keys (the adapter name kept), read back if offloaded.

        Args:
            adapter_name: the adapter to read.
        """
        self._check_known([adapter_name])
        offloaded = self._offload.is_offloaded(adapter_name)
        if offloaded:
            kind = self._offload.records[adapter_name].kind
            self._offload.restore(self._adapter_modules, adapter_name)
        try:
            tensors: dict[str, torch.Tensor] = {}
            seen: set[int] = set()
            for slot, (_, tensor) in self._adapter_tensors(adapter_name).items():
                value = tensor.detach().cpu()
                # safetensors refuses tensors that share memory; adapters are small, so copy the repeats
                tensors[slot.swift_key(adapter_name)] = value.clone() if value.data_ptr() in seen else value
                seen.add(value.data_ptr())
            return tensors
        finally:
            if offloaded:
                self._offload.offload(self._adapter_modules, adapter_name, kind)

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
        slots = self._adapter_tensors(adapter_name)
        tuner = self._in_place_tuner(adapter_name)
        in_place = tuner is not None
        if in_place:
            # an in-place tuner saved through PEFT (get_peft_model) names its tensors its own way
            peft_layout = any(tuner.peft_checkpoint_key(slot.path) in weights for slot in slots)
            peft_key = tuner.peft_checkpoint_key
            key_of = (lambda slot: peft_key(slot.path)) if peft_layout else (lambda slot: slot.swift_key(saved_as))
        else:
            peft_layout = any(key.startswith(PEFT_KEY_PREFIX) for key in weights)
            key_of = (lambda slot: slot.peft_key()) if peft_layout else (lambda slot: slot.swift_key(saved_as))
        by_key: dict[str, tuple[Slot, str, torch.Tensor]] = {key_of(s): (s, k, t) for s, (k, t) in slots.items()}
        missing = [key for key, (slot, _, _) in by_key.items() if slot.required and key not in weights]
        unexpected = [key for key in weights if key not in by_key]
        mismatched = [
            f"{key}: checkpoint {tuple(weights[key].shape)} vs model {tuple(tensor.shape)}"
            for key, (_, _, tensor) in by_key.items()
            if key in weights and tuple(weights[key].shape) != tuple(tensor.shape)
        ]
        mismatched += [
            f"{key}: checkpoint dtype {weights[key].dtype} for a {tensor.dtype} tensor"
            for key, (_, _, tensor) in by_key.items()
            if key in weights and tensor.is_floating_point() and not weights[key].is_floating_point()
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{source} does not fit adapter {adapter_name!r} of this model: "
                + "; ".join(
                    f"{label} keys: {_preview(keys)}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
                    if keys
                )
            )
        state = {
            model_key: weights[key].to(tensor.dtype)
            for key, (_, model_key, tensor) in by_key.items()
            if key in weights
        }
        # an in-place tuner's tensors are the base model's own: copy into them, never replace them
        assign = assign and not in_place
        self.base_model.load_state_dict(state, strict=False, assign=assign)
        if assign:
            self._structure_changed()


def _preview(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _memory_in_use() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "cuda memory", torch.cuda.memory_allocated() / 2**30
    try:
        import psutil

        return "cpu resident memory", psutil.Process().memory_info().rss / 2**30
    except ImportError:
        import resource

        return "cpu peak resident memory", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def _unwrap_empty_layers(model: nn.Module) -> None:
    """Put the original module back wherever a tuner layer or wrapper has no adapter left."""
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, BaseTunerLayer) and not module._get_available_adapters():
            parent, child = _parent_of(model, path)
            setattr(parent, child, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper) and not module._adapters:
            parent, child = _parent_of(model, path)
            setattr(parent, child, module.original_module)


def _unwrap_all(model: nn.Module, merged: bool) -> None:
    """Replace every tuner layer by its base layer; ``modules_to_save`` copies win when ``merged``."""
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, BaseTunerLayer):
            parent, child = _parent_of(model, path)
            setattr(parent, child, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            parent, child = _parent_of(model, path)
            active = [name for name in module.active_adapters if name in module.modules_to_save]
            setattr(parent, child, module.modules_to_save[active[0]] if merged and active else module.original_module)
