"""Building the matrix's models and running them: adapters added in order, randomised, copied into fresh models."""

from __future__ import annotations

import torch

from peft_swift_ext import Swift, SwiftModel

from ..helpers import randomize_adapter, run
from .cases import MODELS, TUNERS, seeded

ATOL = 1e-5  # the same forward through differently nested modules, in float32
VISIBLE = 1e-3  # every adapter, and every composition, moves the output at least this much


def forward(model: torch.nn.Module, model_key: str) -> torch.Tensor:
    """One seeded forward on the model's test inputs (NEFTune's noise is drawn from the seeded generator)."""
    spec = MODELS[model_key]
    return seeded(lambda: run(model, spec.inputs(), spec.pick))


def build(model_key: str, names: list[str], training: bool = False, weights: dict | None = None) -> SwiftModel:
    """A fresh base with the named adapters added in order; with ``weights``, theirs are loaded in."""
    model = Swift.prepare_model(MODELS[model_key].build(), {name: TUNERS[name].config() for name in names})
    for name in names if weights is not None else ():
        model.load_adapter_weights(name, weights[name], "the pair's adapter", name)
    return model.train(training)


def randomized(model_key: str, names: list[str], training: bool = False) -> tuple[SwiftModel, dict]:
    """The adapters added in order with seeded noise on their weights, and each adapter's weights."""
    model = build(model_key, names, training)
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed=seed + 1)
    return model, {name: model.adapter_state_dict(name) for name in names}


def reference(model_key: str, inner: str, outer: str, weights: dict, training: bool = False) -> torch.Tensor:
    """The composition by hand: ``inner`` alone on its own model, with ``outer``'s maths hooked around it."""
    model = build(model_key, [inner], training, weights)
    handles = TUNERS[outer].reference(model.model, weights[outer], outer)
    try:
        return forward(model, model_key)
    finally:
        for handle in handles:
            handle.remove()


def equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-identical, with the largest difference in the message."""
    assert torch.equal(actual, expected), f"{what}: max abs difference {(actual - expected).abs().max().item()}"
