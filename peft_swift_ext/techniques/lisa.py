"""LISA: layerwise importance sampling (Pan et al., 2024), as used by SWIFT.

Every `interval` steps all decoder layers are frozen and `n_layers` of them, drawn at random, are unfrozen.
Unlike SWIFT's callback, the optimizer must hold every layer from the start (so a layer drawn later is really
updated), and the optimizer state and gradients of layers frozen again are released, so training memory
follows the active layers.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import PeftType
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.contract import TunerHost
from ..core.decoder_layers import find_decoder_layers
from ..core.unwrap import unwrap_model
from ..tuners.lisa.candidates import lisa_candidates
from ..tuners.lisa.config import LisaConfig
from ..tuners.lisa.model import LisaModel


def lisa_config_of(model: nn.Module) -> LisaConfig | None:
    """The `LisaConfig` of a `PeftModel` (or LISA tuner) made with `get_peft_model(model, LisaConfig(...))`, else None.

    Args:
        model: any model or wrapper.
    """
    configs = getattr(model, "peft_config", None)
    configs = configs.values() if isinstance(configs, dict) else ()
    return next((config for config in configs if isinstance(config, LisaConfig)), None)


def lisa_tuner_of(model: nn.Module) -> LisaModel | None:
    """The LISA tuner (`LisaModel`) of a `SwiftModel` holding a LISA adapter, else None.

    Args:
        model: any model or wrapper (a `SwiftModel` inside DDP-style `.module` wrappers is found).
    """
    seen = set()
    while (
        id(model) not in seen
        and not isinstance(model, TunerHost)
        and isinstance(getattr(model, "module", None), nn.Module)
    ):
        seen.add(id(model))
        model = model.module
    tuner = model.tuner_for(PeftType.LISA) if isinstance(model, TunerHost) else None
    return tuner if isinstance(tuner, LisaModel) else None


def _inner_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (used by the Trainer) wraps the torch optimizer as `.optimizer`.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class LisaScheduler:
    """Draws the active decoder layers; call `step()` at the start of every optimizer step.

    Only parameters that were trainable when the scheduler was built are ever unfrozen, so LISA combines with
    PEFT adapters (then it samples which layers' adapters train). A `PeftModel` made with
    `get_peft_model(model, LisaConfig(...))` brings its own config and has every candidate trainable until the
    first `step()`.

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`.
        config: the LISA options; may be omitted for a LISA `PeftModel`, whose config is then used.
        optimizer: the optimizer, built over all trainable parameters *before* this scheduler freezes any. Its
            state for refrozen layers is released. Optional: without it only `requires_grad` is switched.
    """

    def __init__(
        self, model: nn.Module, config: LisaConfig | None = None, optimizer: torch.optim.Optimizer | None = None
    ):
        tuner = lisa_tuner_of(model)
        own = lisa_config_of(model)
        if own is None and tuner is not None:  # a SwiftModel inside a DDP-style wrapper
            own = tuner.peft_config[tuner.adapter_name]
        config = own if config is None else config
        if config is None:
            raise ValueError("LisaScheduler needs a LisaConfig: pass config=, or a model made with get_peft_model")
        if own is not None and own is not config:
            raise ValueError("the model was made with its own LisaConfig; pass config=None to use it")
        base = unwrap_model(model)
        layers = find_decoder_layers(base, config.layers_path, field="LisaConfig.layers_path")[1]
        if config.n_layers > len(layers):
            raise ValueError(f"n_layers={config.n_layers} but the model has only {len(layers)} decoder layers")
        self.config = config
        self.optimizer = _inner_optimizer(optimizer) if optimizer is not None else None
        # Inside a SwiftModel the LISA adapter names its own parameters: the base weights of the decoder layers
        # (also those under another tuner's wrapper, e.g. LoRA's base_layer), never other adapters' weights.
        self.tuner = tuner
        if self.tuner is not None:
            if config.inference_mode:
                raise ValueError("the model's LISA adapter was loaded for inference (is_trainable=False)")
            candidates = self.tuner.candidates
        else:
            candidates = lisa_candidates(base, config, layers, only_trainable=True)
        if not any(candidates.layer_params):
            raise ValueError(
                "no decoder layer has a trainable parameter, so LISA would train nothing: it only switches parameters "
                "that are trainable when it starts (build the scheduler before freezing layers)"
            )
        self.layer_params = candidates.layer_params
        self.embedding_params = candidates.embedding_params
        self.head_params = candidates.head_params
        if self.optimizer is not None:
            self._check_optimizer_holds_all_layers()
        self.layers = layers
        self.generator = torch.Generator().manual_seed(config.seed)
        self.active_layers: list[int] = []
        self.steps = 0

    def _check_optimizer_holds_all_layers(self) -> None:
        per_parameter = getattr(self.optimizer, "optimizers", None)  # create_layerwise_optimizer's stand-in
        if isinstance(per_parameter, dict):
            held = {id(p) for p in per_parameter}
        else:
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [i for i, params in enumerate(self.layer_params) if any(id(p) not in held for p in params)]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the parameters of decoder layers {missing}: they could never be "
                "updated when drawn. Build the optimizer over all trainable parameters before LISA freezes layers."
            )

    def step(self) -> None:
        """Advance one optimizer step; every `interval` steps (starting with the first) draw new layers."""
        if self.steps % self.config.interval == 0:
            self.switch_active_layers()
        self.steps += 1

    def fast_forward(self, steps: int) -> None:
        """Continue the schedule of a run that has made `steps` optimizer steps (resuming from a checkpoint).

        The draws those steps made are drawn again from the seeded generator, and the last one is applied, so the
        next `step()` trains the layers an uninterrupted run would train at that step. Nothing happens for steps
        this scheduler has already made.

        Args:
            steps: optimizer steps made so far (the Trainer's `state.global_step`).

        Raises:
            ValueError: `steps` is not an int, or is below the steps this scheduler has already made.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < self.steps:
            raise ValueError(f"fast_forward needs an int of at least {self.steps} (steps made so far), got {steps!r}")
        interval = self.config.interval
        missing_draws = -(-steps // interval) - -(-self.steps // interval)  # draws are made at 0, interval, ...
        if missing_draws:
            for _ in range(missing_draws):
                self.active_layers = self._draw()
            self._apply_active_layers()
        self.steps = steps

    def switch_active_layers(self) -> None:
        """Freeze all decoder layers, then unfreeze `n_layers` drawn at random."""
        self.active_layers = self._draw()
        self._apply_active_layers()

    def _draw(self) -> list[int]:
        order = torch.randperm(len(self.layer_params), generator=self.generator)
        return sorted(order[: self.config.n_layers].tolist())

    def _apply_active_layers(self) -> None:
        if self.tuner is not None:
            self.tuner.set_active_layers(self.active_layers)  # kept by SwiftModel's trainability refresh
        # One decision per parameter: a head tied to the embeddings trains if either option asks for it.
        trainable = dict.fromkeys(self.embedding_params, self.config.train_embeddings)
        for param in self.head_params:
            trainable[param] = trainable.get(param, False) or self.config.train_head
        for index, params in enumerate(self.layer_params):
            for param in params:
                trainable[param] = index in self.active_layers
        for param, on in trainable.items():
            _set_trainable(param, on, self.optimizer)
        if self.config.checkpoint_frozen_layers:
            for index, layer in enumerate(self.layers):
                set_layer_checkpointing(layer, index not in self.active_layers)

    def stop(self) -> None:
        """End LISA's changes to the layers' forward (frozen-layer checkpointing); `requires_grad` stays as it is."""
        for layer in self.layers:
            set_layer_checkpointing(layer, False)


# Keyword arguments through which decoder layers read and write a KV cache; a recomputed layer would write twice.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _CheckpointedForward:
    """The instance-level `forward` of a frozen layer: its class `forward` under non-reentrant checkpointing.

    Only the layer's inputs are kept; its activations are recomputed when the backward pass reaches it. Outside
    training, or without gradients, the layer runs as usual.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        forward = type(self.layer).forward
        if not (self.layer.training and torch.is_grad_enabled()):
            return forward(self.layer, *args, **kwargs)
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None  # a cache is of no use while training, and the recompute would update it twice
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return checkpoint(forward, self.layer, *args, use_reentrant=False, **kwargs)


def set_layer_checkpointing(layer: nn.Module, on: bool) -> None:
    """Switch LISA's activation checkpointing of one decoder layer on or off.

    A layer that the model already checkpoints (`gradient_checkpointing_enable()`) is left alone.

    Args:
        layer: the decoder layer.
        on: checkpoint it (a frozen layer) or run it normally (an active one).
    """
    current = layer.__dict__.get("forward")
    if on and not isinstance(current, _CheckpointedForward) and not getattr(layer, "gradient_checkpointing", False):
        layer.forward = _CheckpointedForward(layer)
    elif not on and isinstance(current, _CheckpointedForward):
        del layer.forward


def _set_trainable(param: nn.Parameter, trainable: bool, optimizer: torch.optim.Optimizer | None) -> None:
    param.requires_grad_(trainable)
    if not trainable:
        # A leftover gradient would still move the weight, and Adam's moments would keep their memory.
        param.grad = None
        per_parameter = getattr(optimizer, "optimizers", None)
        if isinstance(per_parameter, dict) and param in per_parameter:
            optimizer = per_parameter[param]
        if optimizer is not None:
            optimizer.state.pop(param, None)


class LisaCallback(TrainerCallback):
    """Runs LISA inside a `transformers.Trainer` (or TRL's `SFTTrainer`).

    Layers are first frozen in `on_train_begin`, after the Trainer built its optimizer over all trainable
    parameters, which is what makes later draws effective. The draws follow the Trainer's `global_step`: a run
    resumed from a checkpoint (`trainer.train(resume_from_checkpoint=...)`) trains the layers the uninterrupted run
    would have trained at each step.

    Args:
        config: the LISA options; may be omitted when the Trainer's model was made with
            `get_peft_model(model, LisaConfig(...))`.
    """

    def __init__(self, config: LisaConfig | None = None):
        self.config = config
        self.scheduler: LisaScheduler | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Build the scheduler over the Trainer's model and optimizer (nothing is frozen before this), and continue
        the schedule at the Trainer's `global_step` when resuming.

        Args:
            args: the Trainer's `TrainingArguments`.
            state: the Trainer's `TrainerState`.
            control: the Trainer's `TrainerControl`.
            model: the Trainer's model (plain, `PeftModel` or `SwiftModel`).
            optimizer: the Trainer's optimizer, built over every trainable parameter.
            kwargs: the other objects the Trainer passes.
        """
        self.scheduler = LisaScheduler(model, self.config, optimizer)
        self.scheduler.fast_forward(state.global_step)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Draw new active layers every `interval` steps (of the Trainer's `global_step`).

        Args:
            args: the Trainer's `TrainingArguments`.
            state: the Trainer's `TrainerState`.
            control: the Trainer's `TrainerControl`.
            kwargs: the other objects the Trainer passes.
        """
        if state.global_step < self.scheduler.steps:
            return  # this optimizer step has begun already
        self.scheduler.fast_forward(state.global_step)  # a no-op unless steps were made without this callback
        self.scheduler.step()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Undo frozen-layer checkpointing, so the model runs as it did before training.

        Args:
            args: the Trainer's `TrainingArguments`.
            state: the Trainer's `TrainerState`.
            control: the Trainer's `TrainerControl`.
            kwargs: the other objects the Trainer passes.
        """
        if self.scheduler is not None:
            self.scheduler.stop()
