"""LISA: layerwise importance sampling (Pan et al., 2024), as used by SWIFT.

Every `interval` steps all decoder layers are frozen and `n_layers` of them, drawn at random, are unfrozen.
Unlike SWIFT's callback, the optimizer must hold every layer from the start (so a layer drawn later is really
updated), and the optimizer state and gradients of layers frozen again are released, so training memory
follows the active layers.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ._unwrap import get_input_embeddings, get_output_embeddings, get_submodule_by_path, unwrap_model


@dataclass
class LisaConfig:
    """Options of LISA. SWIFT's names `lisa_activated_layers` and `lisa_step_interval` are accepted as aliases."""

    n_layers: int | None = field(default=None, metadata={"help": "Decoder layers trained at a time."})
    interval: int = field(default=20, metadata={"help": "Optimizer steps between two draws of active layers."})
    train_embeddings: bool = field(default=True, metadata={"help": "Keep the input embeddings trainable."})
    train_head: bool = field(default=True, metadata={"help": "Keep the output head trainable."})
    seed: int = field(default=0, metadata={"help": "Seed of the layer draws, independent of the global RNG."})
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the nn.ModuleList of decoder layers, e.g. 'model.layers'. "
            "Found automatically (the largest list of repeated blocks) when None."
        },
    )
    lisa_activated_layers: InitVar[int | None] = None
    lisa_step_interval: InitVar[int | None] = None

    def __post_init__(self, lisa_activated_layers: int | None, lisa_step_interval: int | None) -> None:
        self.n_layers = _merge_alias("n_layers", self.n_layers, "lisa_activated_layers", lisa_activated_layers)
        if lisa_step_interval is not None:
            if self.interval not in (20, lisa_step_interval):
                raise ValueError(f"interval={self.interval} and lisa_step_interval={lisa_step_interval} disagree")
            self.interval = lisa_step_interval
        if self.n_layers is None:
            raise ValueError("LisaConfig needs n_layers (SWIFT: lisa_activated_layers)")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")


def _merge_alias(name: str, value, alias: str, alias_value):
    if alias_value is not None and value is not None and value != alias_value:
        raise ValueError(f"{name}={value} and {alias}={alias_value} disagree")
    return value if value is not None else alias_value


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The list of decoder blocks of `model`: the largest `nn.ModuleList` whose entries share one class.

    Args:
        model: a plain model (see `unwrap_model`).
        layers_path: dotted path of the list, overriding the search.
    """
    if layers_path is not None:
        layers = get_submodule_by_path(model, layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{layers_path!r} is a {type(layers).__name__}, not an nn.ModuleList of layers")
        return layers
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ValueError(f"no nn.ModuleList of repeated blocks in {type(model).__name__}; pass layers_path")
    return max(candidates, key=lambda layers: sum(p.numel() for p in layers.parameters()))


def _inner_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (used by the Trainer) wraps the torch optimizer as `.optimizer`.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class LisaScheduler:
    """Draws the active decoder layers; call `step()` at the start of every optimizer step.

    Only parameters that were trainable when the scheduler was built are ever unfrozen, so LISA combines with
    PEFT adapters (then it samples which layers' adapters train).

    Args:
        model: a plain model, `PeftModel` or `SwiftModel`.
        config: the LISA options.
        optimizer: the optimizer, built over all trainable parameters *before* this scheduler freezes any. Its
            state for refrozen layers is released. Optional: without it only `requires_grad` is switched.
    """

    def __init__(self, model: nn.Module, config: LisaConfig, optimizer: torch.optim.Optimizer | None = None):
        base = unwrap_model(model)
        layers = find_decoder_layers(base, config.layers_path)
        if config.n_layers > len(layers):
            raise ValueError(f"n_layers={config.n_layers} but the model has only {len(layers)} decoder layers")
        self.config = config
        self.optimizer = _inner_optimizer(optimizer) if optimizer is not None else None
        self.layer_params = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
        in_layers = {id(p) for params in self.layer_params for p in params}
        self.embedding_params = _trainable_params(get_input_embeddings(base), in_layers)
        self.head_params = _trainable_params(get_output_embeddings(base), in_layers)
        if self.optimizer is not None:
            self._check_optimizer_holds_all_layers()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.active_layers: list[int] = []
        self.steps = 0

    def _check_optimizer_holds_all_layers(self) -> None:
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

    def switch_active_layers(self) -> None:
        """Freeze all decoder layers, then unfreeze `n_layers` drawn at random."""
        order = torch.randperm(len(self.layer_params), generator=self.generator)
        self.active_layers = sorted(order[: self.config.n_layers].tolist())
        # One decision per parameter: a head tied to the embeddings trains if either option asks for it.
        trainable = {}
        for param in self.embedding_params:
            trainable[param] = self.config.train_embeddings
        for param in self.head_params:
            trainable[param] = trainable.get(param, False) or self.config.train_head
        for index, params in enumerate(self.layer_params):
            for param in params:
                trainable[param] = index in self.active_layers
        for param, on in trainable.items():
            _set_trainable(param, on, self.optimizer)


def _trainable_params(module: nn.Module | None, exclude: set[int]) -> list[nn.Parameter]:
    if module is None:
        return []
    return [p for p in module.parameters() if p.requires_grad and id(p) not in exclude]


def _set_trainable(param: nn.Parameter, trainable: bool, optimizer: torch.optim.Optimizer | None) -> None:
    param.requires_grad_(trainable)
    if not trainable:
        # A leftover gradient would still move the weight, and Adam's moments would keep their memory.
        param.grad = None
        if optimizer is not None:
            optimizer.state.pop(param, None)


class LisaCallback(TrainerCallback):
    """Runs LISA inside a `transformers.Trainer` (or TRL's `SFTTrainer`).

    Layers are first frozen in `on_train_begin`, after the Trainer built its optimizer over all trainable
    parameters, which is what makes later draws effective.

    Args:
        config: the LISA options.
    """

    def __init__(self, config: LisaConfig):
        self.config = config
        self.scheduler: LisaScheduler | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.scheduler = LisaScheduler(model, self.config, optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.scheduler.step()
