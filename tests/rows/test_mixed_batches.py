"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` for every tuner, through PEFT and a SwiftModel.

Each row's output equals that row run alone with only its adapter active (``"__base__"``: none), in eval mode.
Unknown names, a name count other than the batch's, training mode and merged adapters are refused before anything
runs.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_swift_ext import Swift, SwiftModel
from peft_swift_ext.core.registry import TUNERS
from peft_swift_ext.core.tuner import SwiftBaseTuner

from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter

ATOL = 1e-5
ROWS = ["a", "b", "__base__", "b"]
# prompt tuning joins the mixed batches in tests/rows/test_prompt_rows.py; LISA trains base weights (refused below)
CASES = [case for case in ALL_CASES if not case.id.startswith(("prompt", "vpt"))]


def _rows_of(inputs: dict, count: int) -> dict:
    """The case's inputs repeated to ``count`` rows (each row different: the first input rows, cycled)."""
    batched = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            index = torch.arange(count) % value.shape[0]
            batched[key] = value[index]
        else:
            batched[key] = value
    return batched


def _row(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}


def _alone(model, name: str, inputs: dict, pick) -> torch.Tensor:
    if isinstance(model, SwiftModel):
        model.set_active_adapters([] if name == "__base__" else [name])
        with torch.no_grad():
            return pick(model(**inputs)).float()
    if name == "__base__":
        with model.disable_adapter(), torch.no_grad():
            return pick(model(**inputs)).float()
    model.set_adapter(name)
    with torch.no_grad():
        return pick(model(**inputs)).float()


def _build(case, entry: str):
    model = case.make_model()
    if entry == "peft":
        model = get_peft_model(model, case.make_config(), adapter_name="a")
        model.add_adapter("b", case.make_extra_config())
    else:
        model = Swift.prepare_model(model, {"a": case.make_config(), "b": case.make_extra_config()})
    randomize_adapter(model, "a", seed=0)
    randomize_adapter(model, "b", seed=1)
    return model.eval()


def _entries():
    found = []
    for case in CASES:
        tuner = TUNERS.get(case.make_config().peft_type.value.lower())
        if tuner is not None and tuner.name == "lisa":
            continue
        ours = tuner is not None and issubclass(tuner.model_cls, SwiftBaseTuner) or case.id.startswith(("loraplus",))
        if ours:
            found.append(pytest.param(case, "peft", id=f"{case.id}-peft"))
        if not case.id.startswith(("adalora", "fourierft", "dora")):
            found.append(pytest.param(case, "swift", id=f"{case.id}-swift"))
    return found


@pytest.mark.parametrize(("case", "entry"), _entries())
def test_each_row_equals_that_row_alone_with_its_adapter(case, entry):
    model = _build(case, entry)
    inputs = _rows_of(case.make_inputs(), len(ROWS))
    with torch.no_grad():
        mixed = case.output(model(**inputs, adapter_names=ROWS)).float()
    for i, name in enumerate(ROWS):
        alone = _alone(model, name, _row(inputs, i), case.output)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=0, msg=f"row {i} ({name})")
    if case.changes_eval_outputs:
        assert (mixed[0] - mixed[2]).abs().max() > 1e-4, "the adapter does not change the row, so this proves nothing"


@pytest.mark.parametrize(("case", "entry"), _entries())
def test_bad_adapter_names_are_refused_before_anything_runs(case, entry):
    model = _build(case, entry)
    inputs = _rows_of(case.make_inputs(), len(ROWS))
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.get_base_model().modules()]
    with pytest.raises(ValueError, match="unknown adapter"):
        model(**inputs, adapter_names=["a", "nope", "b", "a"])
    with pytest.raises(ValueError, match=r"adapter_names has 3 name\(s\) but the batch has 4 row\(s\)"):
        model(**inputs, adapter_names=ROWS[:3])
    for hook in hooks:
        hook.remove()
    assert not calls, "a module ran before the bad adapter_names were refused"
    model.train()
    with pytest.raises(ValueError, match="eval mode|training mode"):
        model(**inputs, adapter_names=ROWS)
    model.eval()
    if case.mergeable and entry == "swift":
        model.set_active_adapters(["a"])
        model.merge()
        with pytest.raises(ValueError, match="merged"):
            model(**inputs, adapter_names=ROWS)


@pytest.mark.parametrize(
    "case",
    [c for c in ALL_CASES if c.id.startswith(("adalora", "fourierft", "dora"))],
    ids=lambda case: case.id,
)
def test_adapters_without_per_row_support_are_refused_by_name(case):
    model = _build(case, "swift")
    inputs = _rows_of(case.make_inputs(), len(ROWS))
    with pytest.raises(ValueError, match="per-row selection is not available"):
        model(**inputs, adapter_names=ROWS)


def test_adapters_of_several_types_mix_in_one_batch():
    from peft_swift_ext import AdapterConfig, LoraPlusConfig, SideConfig

    from ..tiny_models import llama_inputs, tiny_llama

    model = Swift.prepare_model(
        tiny_llama(),
        {
            "lora": LoraPlusConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "adapter": AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
            "side": SideConfig(dim=32, target_modules=["mlp"], side_module_name="mlp"),
        },
    )
    for seed, name in enumerate(model.adapters):
        randomize_adapter(model, name, seed)
    model.eval()
    names = ["side", "lora", "__base__", "adapter", "lora"]
    inputs = _rows_of(llama_inputs(), len(names))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = _alone(model, name, _row(inputs, i), lambda out: out.logits)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=0, msg=f"row {i} ({name})")
