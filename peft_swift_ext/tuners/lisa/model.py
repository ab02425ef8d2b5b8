"""LISA as a PEFT tuner: no new weights; the base model's own decoder layers train, a few at a time.

What the tuner does at ``get_peft_model``: freeze every base parameter, then make the LISA candidates trainable
(every decoder layer, and the embeddings / head when the options say so) so that an optimizer built next holds
them all. :class:`~peft_swift_ext.techniques.LisaScheduler` (or :class:`~peft_swift_ext.techniques.LisaCallback`)
then narrows training to ``n_layers`` drawn layers at each draw; the drawing and freezing code is the scheduler's.

Saving (what a checkpoint holds: docs/techniques/lisa.md). Each parameter that belongs in the checkpoint is also
registered, under the same tensor, as ``lisa_<its path with '-' for '.'>`` in a ``ParameterDict`` keyed by the
adapter name on this tuner: PEFT's ``save_pretrained`` picks those entries up like any adapter weight (on every
supported peft version) and ``PeftModel.from_pretrained`` loads them back into the base tensors. A decoder layer
joins the checkpoint at its first gradient (a gradient hook; kept in ``LisaConfig.trained_layers``).

Inside a SwiftModel (``Swift.prepare_model(model, {"lisa": LisaConfig(...), ...})``) this tuner stays outside the
module tree; the SwiftModel asks it which base tensors it saves (``saved_tensors``) and trains
(``trainable_parameters``), and whether it may be switched off (``check_can_restore``). Other tuners' wrappers are
out of the tree while LISA is injected, so its candidates are the base weights only (a LoRA-wrapped projection's
``base_layer.weight`` included), never another adapter's weights.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...compat import set_active_adapters_view
from ...core.decoder_layers import find_decoder_layers
from ...core.paths import canonical_path
from ...core.tuner import SwiftBaseTuner, forget_adapter_configs
from .candidates import LisaCandidates, lisa_candidates
from .config import LisaConfig

ALIAS_PREFIX = "lisa_"


class LisaMarker(nn.Module, BaseTunerLayer):
    """A weightless layer that stands for a LISA adapter in PEFT's layer bookkeeping.

    PEFT finds adapters by their tuner layers (``get_model_status``, ``disable_adapter``); LISA wraps no module, so
    this marker, a child of :class:`LisaModel`, is what those functions see.

    Args:
        adapter_name: the LISA adapter's name.
    """

    # one weightless entry per adapter, so that PEFT's bookkeeping (available adapters, deletion) finds the adapter
    adapter_layer_names = ("lisa_adapter",)
    other_param_names = ()
    tuner_name = "LISA"

    def __init__(self, adapter_name: str) -> None:
        nn.Module.__init__(self)
        self.lisa_adapter = nn.ModuleDict({adapter_name: nn.Identity()})
        set_active_adapters_view(self, [adapter_name])
        self.merged_adapters: list[str] = []
        # PEFT expects these on every tuner layer; the marker wraps no module, so it has no sizes
        self.in_features = self.out_features = None

    # BaseTunerLayer reads weight and bias from the wrapped module; the marker wraps none (and would otherwise find
    # itself as its own base layer and recurse forever)
    @property
    def weight(self) -> None:
        """None: the marker has no weight (LISA's weights are the base model's own)."""
        return None

    @property
    def bias(self) -> None:
        """None: the marker has no bias."""
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError("LisaMarker has no forward: it only marks a LISA adapter")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused by name: the marker holds nothing to merge; merge through the model.

        Args:
            safe_merge: unused.
            adapter_names: unused.
        """
        raise NotImplementedError(
            "LisaMarker only marks a LISA adapter; merge through the model (merge_adapter, merge_and_unload)"
        )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Nothing to move: the weights LISA saves are the base model's own tensors.
        return None


class LisaModel(SwiftBaseTuner):
    """LISA as a registered PEFT method (``PeftType.LISA``): trains the base model's decoder layers in place.

    - ``merge_and_unload()`` returns the base model, already trained (there is nothing to merge).
    - ``unload()`` and ``disable_adapter()`` refuse once anything has trained: the original weights were
      overwritten, so base outputs cannot be restored (keep a copy of the base model if you need them).
    - One LISA adapter per model: two would train the same tensors.
    """

    prefix = ALIAS_PREFIX
    tuner_layer_cls = LisaMarker
    mergeable = True

    # --- injection ------------------------------------------------------------------------------------------------

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("LisaModel wraps no module")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The "adapter weights" are the base model's own tensors: never change their dtype.
        return None

    def _plan_targets(self, model: nn.Module, adapter_name: str, config: LisaConfig) -> list[str]:
        """Check everything that can fail; nothing is wrapped, so no target is returned (see _finish_injection)."""
        others = [name for name in self.peft_config if name != adapter_name]
        if others:
            raise ValueError(
                f"this model already has the LISA adapter {others[0]!r}; LISA trains the base model's own weights, "
                "so a model takes one LISA adapter"
            )
        layers = find_decoder_layers(model, config.layers_path, field="LisaConfig.layers_path")[1]
        if config.n_layers > len(layers):
            raise ValueError(
                f"LisaConfig.n_layers={config.n_layers} but {type(model).__name__} has only {len(layers)} layers"
            )
        beyond = [i for i in config.trained_layers if i >= len(layers)]
        if beyond:
            raise ValueError(
                f"LisaConfig.trained_layers names layers {beyond}, but {type(model).__name__} has {len(layers)} "
                "decoder layers: the checkpoint was made for another model"
            )
        self._candidates = lisa_candidates(model, config, layers, base_only=True)
        return []

    def _finish_injection(self, model: nn.Module, adapter_name: str) -> None:
        """Make the LISA candidates trainable and record which layers the checkpoint carries.

        The parameters of the layers in ``trained_layers`` (and the embeddings / head when configured) are
        registered under this tuner's prefix so that PEFT saves them; every other decoder layer joins the
        checkpoint when it first receives a gradient.
        """
        config: LisaConfig = self.peft_config[adapter_name]
        candidates = vars(self).pop("_candidates")
        # paths in the plain model: other tuners' wrappers (base_layer segments) do not change a weight's name
        self._param_names = {id(p): canonical_path(name) for name, p in model.named_parameters()}
        self._layer_params = candidates.layer_params
        self._embedding_params = candidates.embedding_params if config.train_embeddings else []
        self._head_params = candidates.head_params if config.train_head else []
        # None until a LisaScheduler first draws: then every candidate layer trains (see trainable_parameters)
        self.lisa_active_layers: list[int] | None = None
        self._alias_targets: dict[str, nn.Parameter] = {}
        self._hooks: dict[int, list] = {}
        self.lisa_marker = LisaMarker(adapter_name)
        self._adapter_name = adapter_name
        for param in model.parameters():
            param.requires_grad_(False)
        for param in self._embedding_params + self._head_params:
            self._register_alias(param)
        for index in config.trained_layers:
            for param in self._layer_params[index]:
                self._register_alias(param)
        if not config.inference_mode:
            for param in self._drawn_parameters(all_candidates=True):
                param.requires_grad_(True)
            for index, params in enumerate(self._layer_params):
                if index not in config.trained_layers:
                    self._hooks[index] = [
                        param.register_post_accumulate_grad_hook(functools.partial(self._on_gradient, index))
                        for param in params
                    ]
        # a layer's alias path -> the layer's index, so that loading a checkpoint into this adapter (the Trainer's
        # resume: PeftModel.load_adapter into the existing adapter, whose config is not read again) takes every
        # trained layer the checkpoint holds, not only those this adapter already knew
        self._layer_of_alias = {
            self._alias_name(param): index for index, params in enumerate(self._layer_params) for param in params
        }
        self.register_load_state_dict_pre_hook(_register_aliases_of_loaded_layers)
        self.register_load_state_dict_post_hook(_write_loaded_aliases_into_the_model)

    @property
    def adapter_name(self) -> str:
        """The name of this model's (only) LISA adapter."""
        return self._adapter_name

    @property
    def candidates(self) -> LisaCandidates:
        """The parameters LISA switches: each decoder layer's, and the embeddings' / head's when they train."""
        return LisaCandidates(
            [list(params) for params in self._layer_params], list(self._embedding_params), list(self._head_params)
        )

    def set_active_layers(self, indices: list[int]) -> None:
        """Record the decoder layers a LISA scheduler drew (what :meth:`trainable_parameters` reports from now on).

        Args:
            indices: the drawn layers' indices.
        """
        self.lisa_active_layers = list(indices)

    def _alias_name(self, param: nn.Parameter) -> str:
        return ALIAS_PREFIX + self._param_names[id(param)].replace(".", "-")

    def _register_alias(self, param: nn.Parameter) -> None:
        name = self._alias_name(param)
        if name not in self._modules:
            self.add_module(name, nn.ParameterDict({self._adapter_name: param}))
            self._alias_targets[name] = param

    def _on_gradient(self, index: int, param: torch.Tensor) -> None:
        """First gradient into decoder layer ``index``: from now on the checkpoint carries that layer."""
        if index in self._hooks:
            self._mark_trained(index)

    def _mark_trained(self, index: int) -> None:
        """Decoder layer ``index`` has trained (it got a gradient, or a checkpoint holds it): save it from now on."""
        for handle in self._hooks.pop(index, ()):
            handle.remove()
        for layer_param in self._layer_params[index]:
            self._register_alias(layer_param)
        config = self.peft_config[self._adapter_name]
        config.trained_layers = sorted({*config.trained_layers, index})

    # --- inside a SwiftModel -----------------------------------------------------------------------------------
    # A SwiftModel keeps this tuner outside its module tree and asks it, through the methods below, which base
    # tensors LISA saves and trains (LISA has no tuner layers for SwiftModel's generic bookkeeping to find).

    def saved_tensors(self) -> dict[str, nn.Parameter]:
        """The base parameters this adapter's checkpoint carries, by their path in the plain model.

        That is the embeddings / head when they train, and every decoder layer that has received a gradient (or was
        listed in ``trained_layers`` when the adapter was made). Inside a SwiftModel the paths have no
        ``base_layer`` segments.
        """
        return {self._param_names[id(param)]: param for param in self._alias_targets.values()}

    def loadable_tensors(self) -> dict[str, nn.Parameter]:
        """Every base parameter a checkpoint of this adapter may hold: the saved ones and every candidate layer's.

        Resuming loads a checkpoint whose layers trained in the earlier run but not yet in this one.
        """
        candidates = [p for layer in self._layer_params for p in layer] + list(self._alias_targets.values())
        return {self._param_names[id(param)]: param for param in candidates}

    def mark_loaded(self, paths: list[str]) -> None:
        """A checkpoint holding the base parameters at ``paths`` was loaded: their layers have trained.

        Args:
            paths: the loaded parameters' paths in the plain model.
        """
        index_of = {self._param_names[id(p)]: i for i, layer in enumerate(self._layer_params) for p in layer}
        for index in sorted({index_of[path] for path in paths if path in index_of}):
            self._mark_trained(index)

    @staticmethod
    def peft_checkpoint_key(path: str) -> str:
        """The key under which PEFT's ``save_pretrained`` writes the base parameter at ``path`` (its alias).

        Args:
            path: the parameter's path in the plain model.
        """
        return f"base_model.{ALIAS_PREFIX}{path.replace('.', '-')}"

    def trainable_parameters(self, all_candidates: bool = False) -> list[nn.Parameter]:
        """The base parameters LISA wants trainable now: the drawn layers' (every layer's before the first draw),
        plus the embeddings / head when configured; none for an adapter loaded for inference.

        Args:
            all_candidates: every layer's parameters, whatever is drawn (what an optimizer must hold).
        """
        if self.peft_config[self._adapter_name].inference_mode:
            return []
        return self._drawn_parameters(all_candidates)

    def _drawn_parameters(self, all_candidates: bool = False) -> list[nn.Parameter]:
        active = self.lisa_active_layers
        params = [
            param
            for index, layer in enumerate(self._layer_params)
            if all_candidates or active is None or index in active
            for param in layer
        ]
        params += self._embedding_params + self._head_params
        return list({id(p): p for p in params}.values())

    def check_can_restore(self, action: str) -> None:
        """Raise a ``ValueError`` naming ``action`` once anything has trained (the base outputs are gone).

        Args:
            action: what was asked, for the message (e.g. ``"deactivate adapter 'lisa'"``).
        """
        if self.has_trained:
            raise ValueError(
                f"LISA cannot {action}: it trains the base model's own weights in place (decoder layers "
                f"{self.peft_config[self._adapter_name].trained_layers} have changed), so the original model is "
                "gone. Keep a copy of the base model, or load it again, to compare with it; merge_and_unload() "
                "returns the trained model."
            )

    def remove_adapter_structures(self, adapter_name: str) -> None:
        """Drop the gradient hooks and checkpoint aliases of ``adapter_name`` (SwiftModel's deletion/rollback).

        Args:
            adapter_name: the LISA adapter being removed.
        """
        if adapter_name == getattr(self, "_adapter_name", None):
            self._release()

    def finalize_unload(self, merged: bool) -> None:
        """SwiftModel's unload: the trained weights stay in the base model; only the bookkeeping goes.

        Args:
            merged: whether the other adapters were merged (SwiftModel refuses a plain unload once LISA trained).
        """
        self._release()

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        # LISA trains the base weights themselves: no row of a batch could run without its training
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names: per-row selection is not available for LISA, which trains the base weights in place"
            )
        yield

    @contextlib.contextmanager
    def adapters(self, *adapter_names: str) -> Iterator[None]:
        """Refused: LISA trains the base weights in place, so no block of code can run with or without it.

        Args:
            *adapter_names: the adapters a scope would select.
        """
        raise ValueError(
            f"adapters{adapter_names}: a scope cannot select LISA's adapter, which trains the base weights in place"
        )
        yield  # pragma: no cover - a generator, so that it stays a context manager

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # Trainability is decided in inject_adapter and then by the LISA scheduler.
        return None

    @property
    def has_trained(self) -> bool:
        """Whether any decoder layer has received a gradient (the base weights may have changed)."""
        return bool(self.peft_config[self._adapter_name].trained_layers)

    # --- switching off, unloading ---------------------------------------------------------------------------------

    def disable_adapter_layers(self) -> None:
        """Freeze LISA's candidates and mark the adapter disabled; refused once anything has trained.

        Before any training the model is still the base model, so disabling only stops LISA from training (as
        PEFT's ``disable_adapter_layers`` freezes adapter weights); afterwards the base outputs are gone.
        """
        self.check_can_restore("disable the adapter")
        for param in self._drawn_parameters(all_candidates=True):
            param.requires_grad_(False)
        self.lisa_marker.enable_adapters(False)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the parameters LISA trains now are trainable again."""
        marker = self.lisa_marker
        if not marker.disable_adapters:
            return
        marker.enable_adapters(True)
        for param in self.trainable_parameters():
            param.requires_grad_(True)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Let the LISA adapter train (the parameters it trains now) or freeze every parameter it may train.

        Args:
            adapter_names: the adapter(s) to switch; names of no LISA adapter are ignored.
            requires_grad: train (True) or freeze (False).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self._adapter_name not in names:
            return
        for param in self._drawn_parameters(all_candidates=not requires_grad):
            param.requires_grad_(requires_grad)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Mark the adapter merged: its weights already are the base model's (PEFT's warning if already marked).

        Args:
            adapter_names: the adapters to merge; the active one by default.
            safe_merge: first check the weights LISA trains for NaN or infinity.
        """
        self._check_merge_allowed()
        marker = self.lisa_marker
        names = [name for name in check_adapters_to_merge(marker, adapter_names) if name == self._adapter_name]
        if names and safe_merge:
            self._check_finite()
        marker.merged_adapters.extend(names)

    def unmerge_adapter(self) -> None:
        """Forget the merge mark (the weights stay as trained)."""
        marker = self.lisa_marker
        if not marker.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        marker.merged_adapters.clear()

    def _check_finite(self) -> None:
        for param in [*self._drawn_parameters(all_candidates=True), *self._alias_targets.values()]:
            if not torch.isfinite(param).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {self._adapter_name} seems to be broken"
                )

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (a model has one LISA adapter, so this only checks the name).

        Args:
            adapter_name (str | list[str]): the adapter's name (or a list holding it).
            inference_mode: unused: trainability is the LISA scheduler's to decide.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown LISA adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self.active_adapter = names

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ) -> nn.Module:
        # PEFT's merge_and_unload / unload: the trained model stays, LISA's bookkeeping and configs go
        if not merge:
            self.check_can_restore("unload() back to the original model")
        elif safe_merge:
            self._check_finite()
        self._release()
        forget_adapter_configs(self.model)
        return self.model

    def _release(self) -> None:
        """Drop the gradient hooks, the checkpoint aliases and the marker (the trained weights stay)."""
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()
        for name in list(self._alias_targets):
            delattr(self, name)
        self._alias_targets.clear()
        if "lisa_marker" in self._modules:
            del self.lisa_marker

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the LISA adapter's bookkeeping; refused once anything has trained (the weights cannot go back).

        Args:
            adapter_name: the adapter to delete.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.check_can_restore(f"delete adapter {adapter_name!r}")
        self._release()
        del self.peft_config[adapter_name]
        self.active_adapter = []


def _register_aliases_of_loaded_layers(module: LisaModel, state_dict, prefix: str, *args) -> None:
    """Before a state dict loads into the tuner: every decoder layer it holds an alias of has trained, so register
    that layer's aliases (they then load into the base tensors) and record it in ``trained_layers``.

    PEFT maps a checkpoint key to the adapter's key (``<alias>`` -> ``<alias>.<adapter>``) only for aliases that
    existed before the load (peft >= 0.21 remaps from the model's own keys), so the new ones are mapped here. Keys of
    no LISA candidate layer are left alone: ``load_state_dict`` reports them as unexpected.
    """
    trained = set()
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        alias, _, rest = key[len(prefix) :].partition(".")
        index = module._layer_of_alias.get(alias)
        if index is None:
            continue
        trained.add(index)
        if not rest:  # the adapter name was not inserted
            state_dict[f"{prefix}{alias}.{module._adapter_name}"] = state_dict.pop(key)
    for index in sorted(trained):
        module._mark_trained(index)


def _write_loaded_aliases_into_the_model(module: LisaModel, incompatible_keys) -> None:
    """After ``load_state_dict(assign=True)`` (PEFT's ``low_cpu_mem_usage``) an alias may hold a new tensor: copy it
    into the model's own parameter and point the alias back at that parameter."""
    for alias_name, target in module._alias_targets.items():
        container = module._modules[alias_name]
        loaded = container[module._adapter_name]
        if loaded is not target:
            with torch.no_grad():
                target.copy_(loaded)
            container[module._adapter_name] = target
