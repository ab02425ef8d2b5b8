"""Saving and loading through PEFT's API: files, state, outputs, several adapters, low_cpu_mem_usage, configs."""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file

from .common import adapted, case_params, outputs, perturb, train

pytestmark = pytest.mark.parametrize("case", case_params())

FORMATS = pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])


def weights_file(safe: bool) -> str:
    return "adapter_model.safetensors" if safe else "adapter_model.bin"


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=0, rtol=0, msg=key)


def test_adapter_name_appears_in_the_model(case):
    model = get_peft_model(case.make_model(), case.make_config(), adapter_name="test-adapter")
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_modules()]
    assert any("test-adapter" in name for name in names)


@FORMATS
def test_save_and_reload_gives_the_same_state_and_outputs(case, safe, tmp_path):
    model = adapted(case)
    expected = outputs(case, model)
    model.save_pretrained(tmp_path, safe_serialization=safe)

    assert (tmp_path / weights_file(safe)).is_file()
    assert (tmp_path / "adapter_config.json").is_file()
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in re.search(r"---\n(.*?)\n---", card, re.DOTALL).group(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert_same_state(loaded.state_dict(), model.state_dict())
    torch.testing.assert_close(outputs(case, loaded), expected, atol=0, rtol=0)


@FORMATS
def test_save_several_adapters_then_only_the_selected_one(case, safe, tmp_path):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = adapted(case)
    model.add_adapter("new_adapter", case.make_config())
    perturb(case, model, "new_adapter", seed=1)
    model.save_pretrained(tmp_path / "all", safe_serialization=safe)
    assert (tmp_path / "all" / weights_file(safe)).is_file()
    assert (tmp_path / "all" / "new_adapter" / weights_file(safe)).is_file()
    assert (tmp_path / "all" / "new_adapter" / "adapter_config.json").is_file()

    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "new_adapter", "new_adapter")
    assert_same_state(loaded.state_dict(), model.state_dict())

    model.save_pretrained(tmp_path / "selected", selected_adapters=["default"], safe_serialization=safe)
    only_default = PeftModel.from_pretrained(case.make_model(), tmp_path / "selected")
    assert list(only_default.peft_config) == ["default"]
    assert not (tmp_path / "selected" / "new_adapter").exists()


def test_selected_adapter_is_saved_alone_despite_similar_names(case, tmp_path):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = adapted(case)
    expected_keys = set(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, case.make_config())
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == expected_keys


def test_low_cpu_mem_usage_load_gives_real_tensors_and_same_outputs(case, tmp_path):
    model = adapted(case)
    expected = outputs(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(outputs(case, loaded), expected, atol=0, rtol=0)


def test_low_cpu_mem_usage_load_adapter_gives_real_tensors(case, tmp_path):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = adapted(case)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    loaded.set_adapter("other")
    torch.testing.assert_close(outputs(case, loaded), outputs(case, model), atol=0, rtol=0)


def test_low_cpu_mem_usage_injection_leaves_new_weights_on_meta(case):
    if case.weightless or case.in_place:
        pytest.skip(f"{case.tuner} adds no weights of its own, so nothing can wait on the meta device")
    model = case.make_model()
    inject_adapter_in_model(case.make_config(), model, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in model.parameters()}


def test_from_pretrained_keeps_the_given_config(case, tmp_path):
    adapted(case).save_pretrained(tmp_path)
    config = case.make_config()
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config
    assert config.inference_mode
    assert not [name for name, p in loaded.named_parameters() if p.requires_grad]


def test_saved_config_reads_back_as_the_same_config(case, tmp_path):
    model = adapted(case)
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.peft_config["default"])
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == str(model.peft_config["default"].peft_type.value)


def test_loading_one_checkpoint_under_new_names_misses_no_key(case, tmp_path):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    adapted(case).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(case.make_model(), tmp_path)
    for name in ("other", "yet-another"):
        result = model.load_adapter(tmp_path, adapter_name=name)
        assert result.missing_keys == [], name


def test_trained_weights_survive_save_and_reload(case, tmp_path):
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights to train")
    model = get_peft_model(case.make_model(), case.make_config())
    torch.manual_seed(0)
    train(case, model, steps=3)
    model.eval()
    trained = outputs(case, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    assert_same_state(get_peft_model_state_dict(loaded), get_peft_model_state_dict(model))
    torch.testing.assert_close(outputs(case, loaded), trained, atol=1e-6, rtol=0)


def test_base_model_state_dict_reads_and_writes_the_base_weights_only(case):
    if not hasattr(peft, "get_base_model_state_dict"):
        pytest.skip(f"peft {peft.__version__} has no get_base_model_state_dict (added in 0.20)")
    expected = case.make_model().state_dict()
    model = adapted(case, perturbed=not case.in_place)  # an in-place adapter's weights are the base's
    state = peft.get_base_model_state_dict(model)
    assert_same_state(state, expected)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = peft.set_base_model_state_dict(model, expected, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(peft.get_base_model_state_dict(model), expected)
