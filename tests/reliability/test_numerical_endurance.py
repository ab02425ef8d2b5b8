"""Numerical endurance: repeated merge/unmerge does not drift, and adapters run in another precision than
their base (fp16/bf16 adapters on fp32 bases, fp32 adapters on fp16/bf16 bases).

References are computed another way: the base weights cloned before any merge, and the outputs of the same
model entirely in fp32.
"""

from __future__ import annotations

import os

import pytest
import torch

from peft_swift_ext import Swift

from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter, run
from ._common import MERGEABLE_CASES, cast_adapter, swift_model_of

CYCLES = 1000
DRIFT = 1e-5
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# relative to the largest output: fp16 keeps ~3 decimal digits, bf16 ~2
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
# One case per tuner family in CI (the precision handling is per layer type, not per model); the UNet cases
# take seconds per forward on a CPU. RELIABILITY_FULL=1 runs every contract case.
_CI_MIXED = {
    "adapter-bert", "llamapro-llama", "longlora-llama", "lora-llama", "neftune-llama", "dora-llama",
    "prompt-llama", "restuning-vit", "side-bert",
}  # fmt: skip
FULL = os.environ.get("RELIABILITY_FULL") == "1"
MIXED_CASES = [c for c in ALL_CASES if FULL or c.id in _CI_MIXED]


def mixed_params(cases):
    """The cases as pytest parameters named by their ids."""
    return [pytest.param(case, id=case.id) for case in cases]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items() if v.is_floating_point()}


def max_drift(model, original: dict[str, torch.Tensor]) -> float:
    state = model.model.state_dict()
    return max((state[k].float() - v.float()).abs().max().item() for k, v in original.items() if k in state)


@pytest.mark.parametrize("case", MERGEABLE_CASES, ids=[case.id for case in MERGEABLE_CASES])
def test_thousand_merge_unmerge_cycles_drift_at_most_1e5(case):
    model = swift_model_of(case)
    inputs = case.make_inputs()
    tuned = run(model, inputs, case.output)
    original = base_weights(model)
    for _ in range(CYCLES):
        Swift.merge(model)
        Swift.unmerge(model)
    assert max_drift(model, original) <= DRIFT
    torch.testing.assert_close(run(model, inputs, case.output), tuned, atol=DRIFT, rtol=0)


def within(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    tolerance = TOLERANCE[dtype] * expected.abs().max().item()
    assert (actual.float() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("case", mixed_params(MIXED_CASES))
def test_half_adapter_on_fp32_base_keeps_fp32_output(case, dtype):
    model = swift_model_of(case)
    inputs = case.make_inputs()
    reference = run(model, inputs, case.output)
    cast_adapter(model, "first", dtype)
    with torch.no_grad():
        output = case.output(model(**inputs))
    assert output.dtype == torch.float32, "a half-precision adapter must not lower the model's output precision"
    within(output, reference, dtype)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("case", mixed_params(MIXED_CASES))
def test_fp32_adapter_on_half_base_keeps_half_output(case, dtype):
    reference = run(swift_model_of(case), case.make_inputs(), case.output)
    model = Swift.prepare_model(case.make_model().to(dtype), {"first": case.make_config()}).eval()
    randomize_adapter(model, "first", seed=0)
    cast_adapter(model, "first", torch.float32)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.make_inputs().items()}
    with torch.no_grad():
        output = case.output(model(**inputs))
    assert output.dtype == dtype
    within(output, reference, dtype)


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("case", mixed_params(MERGEABLE_CASES))
def test_half_adapter_merge_cycles_on_fp32_base_drift_at_most_1e5(case, dtype):
    model = swift_model_of(case)
    cast_adapter(model, "first", dtype)
    inputs = case.make_inputs()
    unmerged = run(model, inputs, case.output)
    original = base_weights(model)
    Swift.merge(model)
    within(run(model, inputs, case.output), unmerged, dtype)
    Swift.unmerge(model)
    for _ in range(CYCLES // 20 - 1):
        Swift.merge(model)
        Swift.unmerge(model)
    assert max_drift(model, original) <= DRIFT


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("case", MERGEABLE_CASES, ids=[case.id for case in MERGEABLE_CASES])
def test_fp32_adapter_merge_on_half_base_restores_within_two_roundings(case, dtype):
    # merging into a half weight rounds W + delta; unmerging rounds again, so one cycle may move a weight by
    # the rounding of both steps (2 units in the last place), but it must not accumulate beyond that
    model = Swift.prepare_model(case.make_model().to(dtype), {"first": case.make_config()}).eval()
    randomize_adapter(model, "first", seed=0)
    cast_adapter(model, "first", torch.float32)
    original = base_weights(model)
    Swift.merge(model)
    Swift.unmerge(model)
    one_cycle = max_drift(model, original)
    largest = max(v.abs().max().item() for v in original.values())
    assert one_cycle <= 2 * torch.finfo(dtype).eps * largest
