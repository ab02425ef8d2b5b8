"""The contract every registered tuner keeps, through PEFT's API and through the Swift shim.

Each case in ``cases/`` is one tuner on a tiny model; adapters are randomised after creation so that
zero-initialised tuners are not trivially the identity.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_swift_ext import Swift, SwiftModel
from peft_swift_ext.core.keys import adapter_tensors

from ..helpers import adapter_parameter_ids, randomize_adapter, run, state_hash
from .cases import ALL_CASES

pytestmark = pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])

ATOL = 1e-6


@pytest.fixture(autouse=True)
def _known_defects(request, case):
    reason = case.known_defects.get(request.node.originalname)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


@pytest.fixture(autouse=True)
def _not_applicable(request, case):
    reason = case.not_applicable.get(request.node.originalname)
    if reason:
        pytest.skip(f"not applicable to {case.id}: {reason}")


def adapted(case, adapter_seed: int = 0) -> PeftModel:
    model = get_peft_model(case.make_model(), case.make_config())
    randomize_adapter(model, "default", seed=adapter_seed)
    return model.eval()


def reference_outputs(case) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the base model and of the randomised adapter (seed 0), each on a fresh model."""
    inputs = case.make_inputs()
    base = run(case.make_model(), inputs, case.output)
    return base, run(adapted(case), inputs, case.output)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_differs(case, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if case.changes_eval_outputs:
        assert (actual - expected).abs().max() > 1e-4, "the adapter does not change the output"
    else:
        assert_same(actual, expected)


# --- PEFT's API -------------------------------------------------------------------------------------------------


def test_adapter_changes_output(case):
    base, tuned = reference_outputs(case)
    assert_differs(case, tuned, base)


def test_only_adapter_parameters_are_trainable(case):
    model = get_peft_model(case.make_model(), case.make_config())
    adapter_params = adapter_parameter_ids(model, "default")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(id(p) in adapter_params for p in model.parameters() if p.requires_grad), trainable
    if adapter_params:
        assert trainable, "no adapter parameter is trainable"


def test_gradients_reach_every_trainable_parameter(case):
    model = adapted(case).train()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        pytest.skip(f"{case.id} has no trainable parameters")
    case.output(model(**case.make_inputs())).float().pow(2).mean().backward()
    missing = [name for name, p in trainable if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert sum(p.grad.abs().sum() for _, p in trainable) > 0


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_save_and_load_gives_same_outputs(case, safe, tmp_path):
    _, tuned = reference_outputs(case)
    adapted(case).save_pretrained(tmp_path, safe_serialization=safe)
    expected_file = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert (tmp_path / expected_file).is_file()
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    assert_same(run(loaded, case.make_inputs(), case.output), tuned)


def test_low_cpu_mem_usage_load_gives_same_outputs(case, tmp_path):
    _, tuned = reference_outputs(case)
    adapted(case).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert_same(run(loaded, case.make_inputs(), case.output), tuned)


def test_peft_config_from_pretrained_restores_config(case, tmp_path):
    model = adapted(case)
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.peft_config["default"])
    ignored = ("inference_mode", "auto_mapping")  # set by save_pretrained itself
    saved = {k: v for k, v in config.to_dict().items() if k not in ignored}
    assert saved == {k: v for k, v in model.peft_config["default"].to_dict().items() if k not in ignored}


def test_load_adapter_under_second_name_and_switch(case, tmp_path):
    _, tuned = reference_outputs(case)
    adapted(case).save_pretrained(tmp_path)
    other = adapted(case, adapter_seed=7)
    own = run(other, case.make_inputs(), case.output)
    other.load_adapter(tmp_path, adapter_name="loaded")
    other.set_adapter("loaded")
    assert_same(run(other, case.make_inputs(), case.output), tuned)
    other.set_adapter("default")
    assert_same(run(other, case.make_inputs(), case.output), own)


def test_disable_adapter_gives_base_outputs(case):
    base, tuned = reference_outputs(case)
    model = adapted(case)
    with model.disable_adapter():
        assert_same(run(model, case.make_inputs(), case.output), base)
    assert_same(run(model, case.make_inputs(), case.output), tuned)


def test_several_adapters_of_one_type(case):
    _, tuned = reference_outputs(case)
    model = adapted(case)
    model.add_adapter("second", case.make_extra_config())
    randomize_adapter(model, "second", seed=3)
    model.set_adapter("second")
    second = run(model, case.make_inputs(), case.output)
    assert_differs(case, second, tuned)
    model.set_adapter("default")
    assert_same(run(model, case.make_inputs(), case.output), tuned)


def test_delete_adapter_keeps_the_other(case):
    _, tuned = reference_outputs(case)
    model = adapted(case)
    model.add_adapter("second", case.make_extra_config())
    model.set_adapter("second")
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    model.set_adapter("default")
    assert_same(run(model, case.make_inputs(), case.output), tuned)


def test_merge_and_unload_or_clear_refusal(case):
    _, tuned = reference_outputs(case)
    model = adapted(case)
    if case.mergeable:
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert_same(run(merged, case.make_inputs(), case.output), tuned, atol=1e-5)
    else:
        before = state_hash(model)
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_and_unload()
        assert state_hash(model) == before


def test_unload_restores_base_exactly(case):
    base, _ = reference_outputs(case)
    unloaded = adapted(case).unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert state_hash(unloaded) == state_hash(case.make_model())
    torch.testing.assert_close(run(unloaded, case.make_inputs(), case.output), base, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward(case, dtype):
    if not case.half_precision:
        pytest.skip(f"{case.id} declares no half-precision support")
    _, tuned = reference_outputs(case)
    model = get_peft_model(case.make_model().to(dtype), case.make_config())
    randomize_adapter(model, "default", seed=0)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.make_inputs().items()}
    out = run(model, inputs, case.output)
    assert torch.isfinite(out).all()
    tolerance = 0.05 * tuned.abs().max().item() + 0.05
    assert (out - tuned).abs().max() <= tolerance


# --- the Swift shim ---------------------------------------------------------------------------------------------


def swift_adapted(case, names=("first",)) -> SwiftModel:
    model = Swift.prepare_model(case.make_model(), {name: case.make_config() for name in names})
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed=seed)
    return model.eval()


def test_swift_matches_peft_outputs(case):
    _, tuned = reference_outputs(case)
    assert_same(run(swift_adapted(case), case.make_inputs(), case.output), tuned)


def test_swift_save_and_load_with_rename(case, tmp_path):
    model = swift_adapted(case)
    tuned = run(model, case.make_inputs(), case.output)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "first" / "adapter_model.safetensors").is_file()
    loaded = Swift.from_pretrained(case.make_model(), tmp_path, adapter_name={"first": "renamed"})
    assert loaded.adapters == ["renamed"]
    assert_same(run(loaded, case.make_inputs(), case.output), tuned)


def test_swift_deactivate_gives_base_and_activate_restores(case):
    base, _ = reference_outputs(case)
    model = swift_adapted(case)
    tuned = run(model, case.make_inputs(), case.output)
    model.deactivate_adapter("first")
    assert_same(run(model, case.make_inputs(), case.output), base)
    model.activate_adapter("first")
    assert_same(run(model, case.make_inputs(), case.output), tuned)


@pytest.mark.parametrize("offload", ["cpu", "meta"])
def test_swift_offload_and_reactivate_is_bit_exact(case, offload):
    model = swift_adapted(case)
    tuned = run(model, case.make_inputs(), case.output)
    before = {k: v.clone() for k, v in model.adapter_state_dict("first").items()}
    model.deactivate_adapter("first", offload=offload)
    if offload == "meta":
        assert all(t.device.type == "meta" for _, t in adapter_tensors(model.model, "first").values())
    model.activate_adapter("first")
    after = model.adapter_state_dict("first")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(run(model, case.make_inputs(), case.output), tuned, atol=0, rtol=0)


def first_linear_name(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Linear))


def test_swift_mixed_with_lora_switches_each_alone(case, tmp_path):
    base, _ = reference_outputs(case)
    plain = case.make_model()
    lora = LoraConfig(r=2, target_modules=[first_linear_name(plain)], init_lora_weights=False)
    model = Swift.prepare_model(plain, {"tuner": case.make_config(), "lora": lora}).eval()
    randomize_adapter(model, "tuner", seed=0)
    inputs = case.make_inputs()
    both = run(model, inputs, case.output)
    model.set_active_adapters(["lora"])
    lora_only = run(model, inputs, case.output)
    model.set_active_adapters(["tuner"])
    tuner_only = run(model, inputs, case.output)
    model.set_active_adapters([])
    assert_same(run(model, inputs, case.output), base)
    assert_differs(case, tuner_only, base)
    for output in (both, lora_only):
        assert (output - base).abs().max() > 1e-4, "the LoRA beside the tuner does not change the output"
    model.set_active_adapters(["tuner", "lora"])
    model.save_pretrained(tmp_path)
    reloaded = Swift.from_pretrained(case.make_model(), tmp_path)
    assert sorted(reloaded.adapters) == ["lora", "tuner"]
    assert_same(run(reloaded, inputs, case.output), both)


def test_swift_failed_load_leaves_model_unchanged(case, tmp_path):
    model = swift_adapted(case)
    model.save_pretrained(tmp_path)
    weights = model.adapter_state_dict("first")
    if not weights:
        pytest.skip(f"{case.id} saves no weights")
    from safetensors.torch import save_file

    dropped = sorted(weights)[0]
    save_file(
        {k: v for k, v in weights.items() if k != dropped}, str(tmp_path / "first" / "adapter_model.safetensors")
    )
    target = case.make_model()
    before = state_hash(target)
    with pytest.raises(ValueError, match="missing keys"):
        Swift.from_pretrained(target, tmp_path)
    assert state_hash(target) == before
    assert not any(isinstance(m, BaseTunerLayer) for m in target.modules())


def test_swift_merge_unmerge_or_refusal(case):
    model = swift_adapted(case)
    tuned = run(model, case.make_inputs(), case.output)
    if not case.mergeable:
        before = state_hash(model)
        with pytest.raises(ValueError, match="cannot be merged"):
            Swift.merge(model)
        assert state_hash(model) == before
        return
    base_weights = {k: v.clone() for k, v in model.model.state_dict().items() if "base_layer" in k}
    Swift.merge(model)
    assert_same(run(model, case.make_inputs(), case.output), tuned, atol=1e-5)
    Swift.unmerge(model)
    for key, value in model.model.state_dict().items():
        if key in base_weights:
            torch.testing.assert_close(value, base_weights[key], atol=1e-6, rtol=0)
    merged = Swift.merge_and_unload(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert_same(run(merged, case.make_inputs(), case.output), tuned, atol=1e-5)
