"""Merging, unmerging, unloading, and wrapping a merged or unloaded model again."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from peft_swift_ext.compat import ModulesToSaveWrapper

from ..helpers import state_hash
from .common import adapted, adapter_parameters, case_params, outputs, perturb

pytestmark = pytest.mark.parametrize("case", case_params())

ATOL = 1e-5
NAN_MESSAGE = "NaNs detected in the merged weights. The adapter default seems to be broken"


def require_merge(case) -> None:
    if case.merge_refusal:
        pytest.skip(case.merge_refusal)


def no_tuner_layers(model) -> bool:
    return not any(isinstance(module, BaseTunerLayer) for module in model.modules())


def assert_close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_merge_is_refused_before_anything_changes(case):
    if not case.merge_refusal:
        pytest.skip(f"{case.tuner} can merge; merging is checked by the other tests here")
    model = adapted(case)
    before = state_hash(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
    assert state_hash(model) == before


def test_merge_unmerge_and_merge_and_unload_keep_the_outputs(case):
    require_merge(case)
    base = outputs(case, case.make_model())
    model = adapted(case)
    tuned = outputs(case, model)
    model.merge_adapter()
    assert_close(outputs(case, model), tuned)
    model.unmerge_adapter()
    assert_close(outputs(case, model), tuned)
    merged = model.merge_and_unload()
    assert no_tuner_layers(merged)
    assert not hasattr(merged, "peft_config")
    assert_close(outputs(case, merged), tuned)
    if case.eval_effect:
        assert (tuned - base).abs().max() > 1e-4, "the adapter does not change the output"
    assert_close(outputs(case, pickle.loads(pickle.dumps(merged))), tuned)


def test_merging_twice_warns_and_changes_nothing(case):
    require_merge(case)
    model = adapted(case)
    model.merge_adapter()
    once = outputs(case, model)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert_close(outputs(case, model), once, atol=1e-6)


def test_safe_merge_gives_the_unmerged_outputs_and_a_saveable_model(case, tmp_path):
    require_merge(case)
    model = adapted(case)
    tuned = outputs(case, model)
    merged = model.merge_and_unload(safe_merge=True)
    assert_close(outputs(case, merged), tuned)
    # serialising must work: merged weights have to be contiguous tensors without shared storage
    torch.save(merged.state_dict(), tmp_path / "model.bin")
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_refuses_a_broken_adapter(case, bad):
    require_merge(case)
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights that could be broken")
    model = adapted(case, perturbed=False)
    with torch.no_grad():
        for tensor in adapter_parameters(model).values():
            if tensor.is_floating_point():
                tensor.view(-1)[0] = bad
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        model.merge_and_unload(safe_merge=True)


def test_merging_selected_adapters(case):
    require_merge(case)
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    if not case.eval_effect:
        pytest.skip(f"{case.tuner} adapters give the base outputs in eval mode, so merged adapters cannot differ")
    model = adapted(case)
    first = outputs(case, model)
    model.add_adapter("adapter-2", case.make_config())
    perturb(case, model, "adapter-2", seed=1)
    model.set_adapter("adapter-2")
    second = outputs(case, model)
    assert (first - second).abs().max() > 1e-4
    model.set_adapter("default")
    assert_close(outputs(case, model), first, atol=1e-6)

    for name, expected in (("adapter-2", second), ("default", first)):
        copy = _copy(model)
        if any(isinstance(m, ModulesToSaveWrapper) for m in copy.modules()):
            # PEFT unloads a modules_to_save wrapper to the active adapter's copy, whichever adapters are merged
            copy.set_adapter(name)
        assert_close(outputs(case, copy.merge_and_unload(adapter_names=[name])), expected)
    both = model.merge_and_unload(adapter_names=["adapter-2", "default"])
    combined = outputs(case, both)
    assert (combined - first).abs().max() > 1e-4 and (combined - second).abs().max() > 1e-4


def _copy(model):
    return pickle.loads(pickle.dumps(model))


def test_disable_adapter_after_merge_gives_the_base_outputs(case):
    require_merge(case)
    base = outputs(case, case.make_model())
    model = adapted(case)
    tuned = outputs(case, model)
    model.merge_adapter()
    if case.in_place:
        with pytest.raises(ValueError, match="cannot disable"), model.disable_adapter():
            pass
        return
    with model.disable_adapter():
        assert_close(outputs(case, model), base)
    assert_close(outputs(case, model), tuned)


def test_unload_gives_back_the_base_model(case):
    base_model = case.make_model()
    base, base_keys = outputs(case, base_model), set(base_model.state_dict())
    model = adapted(case, perturbed=not case.in_place)
    tuned = outputs(case, model)
    unloaded = model.unload()
    assert no_tuner_layers(unloaded)
    assert not hasattr(unloaded, "peft_config")
    assert set(unloaded.state_dict()) == base_keys
    torch.testing.assert_close(outputs(case, unloaded), base, atol=0, rtol=0)
    if case.eval_effect and not case.in_place:
        assert (tuned - base).abs().max() > 1e-4


def test_unload_after_training_is_refused_by_an_in_place_tuner(case):
    if not case.in_place:
        pytest.skip(f"{case.tuner} keeps the base weights apart from its own, so unload always restores them")
    model = adapted(case)
    with pytest.raises(ValueError, match="unload"):
        model.unload()


@pytest.mark.parametrize("removal", ["merge_and_unload", "unload"])
def test_wrapping_the_returned_model_again_starts_clean(case, removal, tmp_path):
    if removal == "merge_and_unload":
        require_merge(case)
    model = adapted(case, perturbed=not case.in_place)
    plain = getattr(model, removal)()
    assert not hasattr(plain, "peft_config")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = get_peft_model(plain, case.make_config())
    assert not [w for w in caught if "second time" in str(w.message)]
    assert list(again.peft_config) == ["default"]
    again.save_pretrained(tmp_path)
    # one adapter: its config is the top-level adapter_config.json, and no folder for another adapter is written
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == again.peft_config["default"].peft_type.value
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
