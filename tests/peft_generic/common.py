"""What the generic checks share: building an adapted model, making its adapter non-trivial, training it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_swift_ext.core.contract import InPlaceTuner
from peft_swift_ext.core.keys import adapter_tensors

from ..helpers import base_of, randomize_adapter, run
from .cases import CASES, GenericCase

__all__ = ["CASES", "adapted", "adapter_parameters", "loss_of", "outputs", "perturb", "train"]

# The noise added to adapter weights so that identity-initialised adapters (SCEdit, LLaMA-PRO) change outputs.
NOISE = 0.1


def case_params(cases: list[GenericCase] = CASES) -> list:
    """``pytest.param`` per case, named by its id."""
    return [pytest.param(case, id=case.id) for case in cases]


def outputs(case: GenericCase, model: nn.Module, inputs: dict | None = None) -> torch.Tensor:
    """The compared output of one forward without gradients, in float32."""
    return run(model, case.make_inputs() if inputs is None else inputs, case.output)


def loss_of(case: GenericCase, model: nn.Module, inputs: dict | None = None) -> torch.Tensor:
    """A regression loss on the case's output towards a fixed random target (the same for every call)."""
    out = case.output(model(**(case.make_inputs() if inputs is None else inputs))).float()
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out - target).pow(2).mean()


def train(case: GenericCase, model: nn.Module, steps: int, lr: float = 0.05, adam: bool = False) -> list[float]:
    """``steps`` optimizer steps on :func:`loss_of` in training mode; the losses, first to last."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr) if adam else torch.optim.SGD(trainable, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(case, model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def perturb(case: GenericCase, model: PeftModel, adapter_name: str = "default", seed: int = 0) -> None:
    """Make ``adapter_name`` change the outputs: random weights, or, for an in-place tuner, one training step."""
    if case.in_place:
        was_training = model.training
        torch.manual_seed(seed)
        train(case, model, steps=1, lr=0.1)
        model.train(was_training)
        return
    randomize_adapter(model, adapter_name, seed=seed, scale=NOISE)


def adapted(case: GenericCase, adapter_name: str = "default", perturbed: bool = True, **kwargs) -> PeftModel:
    """``get_peft_model`` on a fresh model, in eval mode, with a non-trivial adapter unless ``perturbed=False``."""
    model = get_peft_model(case.make_model(), case.make_config(), adapter_name=adapter_name, **kwargs)
    if perturbed:
        perturb(case, model, adapter_name)
    return model.eval()


def adapter_parameters(
    model: PeftModel, adapter_name: str = "default", modules_to_save: bool = True
) -> dict[int, torch.Tensor]:
    """The tensors that belong to ``adapter_name``, by id: its layers' entries and (unless ``modules_to_save`` is
    False) its ``modules_to_save`` copies; for an in-place tuner, the base tensors it trains."""
    tuner = model.base_model
    if isinstance(tuner, InPlaceTuner):
        tensors = [*tuner.trainable_parameters(all_candidates=True), *tuner.saved_tensors().values()]
        return {id(t): t for t in tensors}
    slots = adapter_tensors(base_of(model), adapter_name).items()
    return {id(t): t for slot, (_, t) in slots if modules_to_save or slot.attr != "modules_to_save"}
