"""Training through PEFT: the loss goes down, only the adapter learns, inference mode freezes, modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_swift_ext.compat import ModulesToSaveWrapper

from .cases import NO_MODULES_TO_SAVE
from .common import adapter_parameters, case_params, loss_of, outputs, train

pytestmark = pytest.mark.parametrize("case", case_params())


def require_weights(case) -> None:
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights to train (it only adds noise in training mode)")


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_training_lowers_the_loss(case):
    require_weights(case)
    model = get_peft_model(case.make_model(), case.make_config())
    torch.manual_seed(0)
    losses = train(case, model, steps=8, lr=1e-2, adam=True)
    assert losses[-1] < losses[0], losses


def test_gradients_reach_the_adapter_and_nothing_else(case):
    require_weights(case)
    model = get_peft_model(case.make_model(), case.make_config()).train()
    own = adapter_parameters(model)
    torch.manual_seed(0)
    loss_of(case, model).backward()
    for name, param in model.named_parameters():
        if id(param) in own and param.requires_grad:
            assert param.grad is not None, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"{name} is not the adapter's but got a gradient"


def test_training_changes_only_the_adapter(case):
    require_weights(case)
    model = get_peft_model(case.make_model(), case.make_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    own = adapter_parameters(model)
    torch.manual_seed(0)
    train(case, model, steps=3, lr=0.1)
    for name, param in model.named_parameters():
        if id(param) in own and param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not learn"
        else:
            torch.testing.assert_close(param.detach(), before[name], atol=0, rtol=0, msg=name)


def test_inference_mode_freezes_the_adapter(case, tmp_path):
    config = case.make_config()
    config.inference_mode = True
    assert not trainable_names(get_peft_model(case.make_model(), config))

    get_peft_model(case.make_model(), case.make_config()).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(case.make_model(), tmp_path)
    assert not trainable_names(frozen)
    trainable = PeftModel.from_pretrained(case.make_model(), tmp_path, is_trainable=True)
    own = adapter_parameters(trainable)
    assert all(id(p) in own for p in trainable.parameters() if p.requires_grad)
    if not case.weightless:
        assert trainable_names(trainable)


def test_modules_to_save_train_save_and_unload(case, tmp_path):
    if case.make_config_with_modules_to_save is None:
        pytest.skip(NO_MODULES_TO_SAVE.format(config=type(case.make_config()).__name__))
    config = case.make_config_with_modules_to_save()
    (saved_name,) = [name for name in config.modules_to_save if name not in (case.make_config().modules_to_save or [])]
    model = get_peft_model(case.make_model(), config)
    wrapper = model.base_model.model.get_submodule(saved_name)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    original = copy.deepcopy(wrapper.original_module.state_dict())
    torch.manual_seed(0)
    train(case, model, steps=3, lr=0.1)
    model.eval()
    trained = outputs(case, model)
    copy_state = wrapper.modules_to_save["default"].state_dict()
    assert any(not torch.equal(copy_state[k], original[k]) for k in original), "the copy did not learn"
    assert all(torch.equal(wrapper.original_module.state_dict()[k], v) for k, v in original.items())

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    torch.testing.assert_close(outputs(case, loaded), trained, atol=1e-6, rtol=0)

    # which module unload() keeps is the tuner's choice (PEFT: the copy; LongLoRA: the original), not a wrapper
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in loaded.unload().modules())
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    kept = merged.get_submodule(saved_name).state_dict()
    assert all(torch.equal(kept[k], copy_state[k]) for k in copy_state)
