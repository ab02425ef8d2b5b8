"""Several adapters on one model: adding, switching, disabling, deleting, and what PEFT reports about them."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_swift_ext.compat import ModulesToSaveWrapper
from peft_swift_ext.core.contract import InPlaceTuner

from .common import adapted, adapter_parameters, case_params, outputs, perturb

pytestmark = pytest.mark.parametrize("case", case_params())


def tuner_layers(model) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def is_mapping(value) -> bool:
    return callable(getattr(value, "keys", None)) and hasattr(value, "__contains__") and hasattr(value, "__getitem__")


def mapping_attributes(obj, private: bool) -> dict[str, object]:
    """Attributes that behave like mappings (per-adapter state is kept in such): public ones, and with
    ``private`` also the object's own underscored ones (a tuner's bookkeeping between calls)."""
    found = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # properties that need an active adapter (there may be none left)
            continue
        if is_mapping(value):
            found[name] = value
    if private:
        found.update({name: value for name, value in vars(obj).items() if name.startswith("_") and is_mapping(value)})
    return found


def holders_of(model, adapter_name: str) -> dict[str, object]:
    """Every mapping on the model, its tuner and its tuner layers that holds ``adapter_name``, by a readable name."""
    owners = {"model": model, "tuner": model.base_model}
    owners.update({f"layer {i} ({type(m).__name__})": m for i, m in enumerate(tuner_layers(model))})
    held = {}
    for owner_name, owner in owners.items():
        for name, value in mapping_attributes(owner, private=owner is not model).items():
            try:
                holds = adapter_name in value
            except TypeError:
                continue
            if holds:
                held[f"{owner_name}.{name}"] = value
    return held


def test_active_adapter_follows_add_and_set(case):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = get_peft_model(case.make_model(), case.make_config())
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", case.make_config())
    assert model.active_adapters == ["default"]
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"


def test_several_adapters_can_be_active_at_once(case):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = get_peft_model(case.make_model(), case.make_config())
    model.add_adapter("other", case.make_config())
    if any(isinstance(module, ModulesToSaveWrapper) for module in model.modules()):
        pytest.skip(f"{case.tuner} trains modules_to_save copies, and PEFT lets one of them be active at a time")
    # a PeftModel names one active adapter; the tuner underneath takes several
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]


def test_switching_adapters_switches_outputs(case):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    if not case.eval_effect:
        pytest.skip(f"{case.tuner} adapters give the base outputs in eval mode, so switching shows no difference")
    model = adapted(case)
    first = outputs(case, model)
    model.add_adapter("other", case.make_config())
    perturb(case, model, "other", seed=1)
    model.set_adapter("other")
    assert (outputs(case, model) - first).abs().max() > 1e-4
    model.set_adapter("default")
    torch.testing.assert_close(outputs(case, model), first, atol=0, rtol=0)


@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
def test_deleting_an_adapter_leaves_nothing_of_it(case, active):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = adapted(case)
    expected = outputs(case, model)
    model.add_adapter("delete_me", case.make_config())
    if active:
        model.set_adapter("delete_me")
    assert holders_of(model, "delete_me"), "no per-adapter mapping holds the new adapter"
    model.delete_adapter("delete_me")
    assert "delete_me" not in model.peft_config
    assert model.active_adapters == ["default"]
    assert not holders_of(model, "delete_me")
    for layer in tuner_layers(model):
        for attr in (*layer.adapter_layer_names, *layer.other_param_names):
            assert "delete_me" not in getattr(layer, attr), f"{type(layer).__name__}.{attr}"
    torch.testing.assert_close(outputs(case, model), expected, atol=0, rtol=0)


def test_deleting_the_last_adapter_leaves_nothing_of_it(case):
    model = adapted(case, adapter_name="foobar", perturbed=False)
    assert holders_of(model, "foobar"), "no per-adapter mapping holds the adapter"
    model.delete_adapter("foobar")
    assert model.active_adapters == []
    assert not holders_of(model, "foobar")
    with torch.no_grad():
        model.base_model(**case.make_inputs())  # the model still runs without any adapter


def test_deleting_an_unknown_adapter_is_a_clear_error(case):
    model = get_peft_model(case.make_model(), case.make_config())
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


def test_disable_adapter_gives_the_base_outputs_or_a_clear_refusal(case):
    base = outputs(case, case.make_model())
    model = adapted(case)
    tuned = outputs(case, model)
    if case.in_place:
        # the base weights themselves were trained: the original outputs are gone, and saying so is the contract
        with pytest.raises(ValueError, match="cannot disable"), model.disable_adapter():
            pass
        return
    if case.eval_effect:
        assert (tuned - base).abs().max() > 1e-4, "the adapter does not change the output"
    with model.disable_adapter():
        torch.testing.assert_close(outputs(case, model), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs(case, model), tuned, atol=0, rtol=0)


def test_disable_adapter_context_restores_the_previous_state(case):
    model = get_peft_model(case.make_model(), case.make_config())
    layers = tuner_layers(model)
    assert layers and all(not layer.disable_adapters for layer in layers)
    with model.disable_adapter():
        assert all(layer.disable_adapters for layer in layers)
    assert all(not layer.disable_adapters for layer in layers)
    model.disable_adapter_layers()
    assert all(layer.disable_adapters for layer in layers)
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in layers)
    model.enable_adapter_layers()
    assert all(not layer.disable_adapters for layer in layers)


def test_disabled_adapters_do_not_train(case):
    model = get_peft_model(case.make_model(), case.make_config())
    own = adapter_parameters(model)
    model.disable_adapter_layers()
    assert not [p for p in own.values() if p.requires_grad]
    model.enable_adapter_layers()
    if not case.weightless:
        assert [p for p in own.values() if p.requires_grad]


def test_mixed_enabled_state_warns_and_ends_enabled(case):
    model = get_peft_model(case.make_model(), case.make_config())
    layers = tuner_layers(model)
    assert len(layers) >= 2, "the case should put at least two tuner layers in the model"
    layers[0].enable_adapters(False)
    assert {layer.disable_adapters for layer in layers} == {True, False}
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert all(not layer.disable_adapters for layer in layers)


def test_model_and_layer_status_report_the_adapters(case):
    model = get_peft_model(case.make_model(), case.make_config())
    layer_status = model.get_layer_status()
    status = model.get_model_status()
    assert status.num_adapter_layers == len(layer_status) >= 1
    assert status.peft_types == {"default": model.peft_config["default"].peft_type.value}
    assert status.enabled is True
    assert status.active_adapters == ["default"]
    assert status.available_adapters == ["default"]
    assert status.merged_adapters == []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert status.trainable_params == trainable
    if not case.weightless and not isinstance(model.base_model, InPlaceTuner):
        assert status.requires_grad == {"default": True}
        assert status.devices == {"default": ["cpu"]}
    for layer in layer_status:
        assert layer.available_adapters == ["default"] and layer.active_adapters == ["default"]

    model.disable_adapter_layers()
    assert model.get_model_status().enabled is False
    model.enable_adapter_layers()
    if not case.merge_refusal:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        # per tuner layer: PEFT's modules_to_save wrappers (LongLoRA's) keep no merge state of their own
        assert all(layer.merged_adapters == ["default"] for layer in tuner_layers(model))
        model.unmerge_adapter()
        assert all(layer.merged_adapters == [] for layer in tuner_layers(model))


def test_tuner_layers_expose_in_and_out_features(case):
    model = get_peft_model(case.make_model(), case.make_config())
    for layer in tuner_layers(model):
        assert hasattr(layer, "in_features") and hasattr(layer, "out_features"), type(layer).__name__
        base = layer.get_base_layer()
        for name in ("in_features", "out_features"):
            if isinstance(getattr(base, name, None), int):  # where the wrapped module knows, the layer agrees
                assert getattr(layer, name) == getattr(base, name)


def test_weight_and_bias_can_be_asked_for_on_every_tuner_layer(case):
    model = get_peft_model(case.make_model(), case.make_config())
    for layer in tuner_layers(model):
        for name in ("weight", "bias"):
            value = getattr(layer, name, None)  # must answer (a tensor, None or AttributeError), never recurse
            base_value = getattr(layer.get_base_layer(), name, None)
            if isinstance(base_value, torch.Tensor):
                assert value is base_value


def test_only_the_active_adapter_trains(case):
    if case.one_adapter:
        pytest.skip(case.one_adapter)
    model = get_peft_model(case.make_model(), case.make_config())
    model.add_adapter("other", case.make_config())
    own = {name: adapter_parameters(model, name, modules_to_save=False) for name in ("default", "other")}
    for active, inactive in (("default", "other"), ("other", "default"), ("default", "other")):
        model.set_adapter(active)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable.isdisjoint(own[inactive]), f"{inactive} trains while {active} is active"
        assert set(own[active]) <= trainable, f"{active} is active but does not train"


def test_set_requires_grad_switches_one_adapter(case):
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights whose training could be switched")
    model = get_peft_model(case.make_model(), case.make_config())
    own = adapter_parameters(model, modules_to_save=False).values()
    model.set_requires_grad("default", requires_grad=False)
    assert not [p for p in own if p.requires_grad]
    model.set_requires_grad("default", requires_grad=True)
    assert all(p.requires_grad for p in own)


def test_the_adapter_name_makes_no_difference(case):
    torch.manual_seed(0)
    first = outputs(case, adapted(case, perturbed=False))
    torch.manual_seed(0)
    renamed = outputs(case, adapted(case, adapter_name="another-name", perturbed=False))
    torch.testing.assert_close(renamed, first, atol=0, rtol=0)


def test_a_different_adapter_per_row_is_served_or_clearly_refused(case):
    model = adapted(case)
    names = ["__base__", "default"]
    if not case.one_adapter:
        model.add_adapter("other", case.make_config())
        perturb(case, model, "other", seed=1)
        names.append("other")
    inputs = case.make_inputs()
    rows = next(iter(inputs.values())).shape[0]
    per_row = [names[i % len(names)] for i in range(rows)]
    if case.in_place:
        # the base weights themselves were trained: a row asking for the base model cannot be served
        with pytest.raises(ValueError, match=r"(?i)row|batch"):
            outputs(case, model, {**inputs, "adapter_names": per_row})
        return
    try:
        mixed = outputs(case, model, {**inputs, "adapter_names": per_row})
    except (ValueError, TypeError) as error:
        assert re.search(r"row|batch", str(error), re.IGNORECASE), error
        return
    for name in names:  # each row must equal that row run with its own adapter alone
        rows_of = [i for i, row_name in enumerate(per_row) if row_name == name]
        if name == "__base__":
            with model.disable_adapter():
                alone = outputs(case, model)
        else:
            model.set_adapter(name)
            alone = outputs(case, model)
        torch.testing.assert_close(mixed[rows_of], alone[rows_of], atol=1e-5, rtol=0, msg=name)
