"""Half-precision bases, PEFT's ``autocast_adapter_dtype``, and moving an adapted model to another dtype."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from .common import adapter_parameters, case_params, outputs

pytestmark = pytest.mark.parametrize("case", case_params())

HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
AUTOCAST = pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def half_model(case, dtype, autocast):
    return get_peft_model(case.make_model().to(dtype), case.make_config(), autocast_adapter_dtype=autocast).eval()


def assert_finite_output(case, model, dtype) -> torch.Tensor:
    out = outputs(case, model, cast_inputs(case.make_inputs(), dtype))
    assert torch.isfinite(out).all()
    return out


@HALF
@AUTOCAST
def test_forward_on_a_half_precision_base(case, dtype, autocast):
    reference = outputs(case, get_peft_model(case.make_model(), case.make_config()).eval())
    out = assert_finite_output(case, half_model(case, dtype, autocast), dtype)
    # the same (fresh, same-seed) adapter in half precision: close to the float32 outputs
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max() + 0.05


@HALF
@AUTOCAST
def test_merge_cycle_on_a_half_precision_base(case, dtype, autocast):
    if case.merge_refusal:
        pytest.skip(case.merge_refusal)
    model = half_model(case, dtype, autocast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "already merged" / "already unmerged" notes
        for safe in (False, True):
            model.merge_adapter(safe_merge=safe)
            assert_finite_output(case, model, dtype)
            model.unmerge_adapter()
            assert_finite_output(case, model, dtype)
        merged = model.merge_and_unload()
    assert_finite_output(case, merged, dtype)


def adapter_dtypes(model, adapter_name: str) -> set[torch.dtype]:
    # modules_to_save copies (LongLoRA's embeddings and norms) are copies of base modules: PEFT keeps their dtype
    tensors = adapter_parameters(model, adapter_name, modules_to_save=False).values()
    return {t.dtype for t in tensors if t.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@AUTOCAST
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["", "low-cpu-mem"])
def test_adapter_dtype_follows_autocast_adapter_dtype(case, dtype, autocast, low_cpu_mem_usage, tmp_path):
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights whose dtype could be checked")
    # PEFT creates adapter weights in the base's dtype and, with autocast_adapter_dtype, upcasts fp16/bf16 ones
    upcast = autocast and dtype in (torch.float16, torch.bfloat16) and not case.keeps_base_dtype
    expected = {torch.float32 if upcast else dtype}
    # peft < 0.19 takes autocast_adapter_dtype in get_peft_model / from_pretrained only, not for further adapters
    several = not case.one_adapter and "autocast_adapter_dtype" in inspect.signature(PeftModel.add_adapter).parameters
    model = get_peft_model(case.make_model().to(dtype), case.make_config(), autocast_adapter_dtype=autocast)
    if several:
        model.add_adapter("other", case.make_config(), autocast_adapter_dtype=autocast)
    for name in model.peft_config:
        assert adapter_dtypes(model, name) == expected, name
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(
        case.make_model().to(dtype), tmp_path, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    if several:
        loaded.load_adapter(
            tmp_path / "other", "other", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
        )
    for name in loaded.peft_config:
        assert adapter_dtypes(loaded, name) == expected, name


def test_moving_to_another_dtype_moves_the_adapter_and_keeps_the_outputs(case):
    model = get_peft_model(case.make_model(), case.make_config()).eval()
    reference = outputs(case, model)
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(**cast_inputs(case.make_inputs(), torch.float64))
    assert case.output(out).dtype == torch.float64
    torch.testing.assert_close(case.output(out).float().detach(), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_adapters_are_created_on_the_base_models_device(case, device, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = get_peft_model(case.make_model().to(device), case.make_config())
    assert {t.device.type for t in adapter_parameters(model).values()} <= {device}
    if device == "meta":
        return  # nothing can run on meta; placement is what it checks
    inputs = {k: v.to(device) for k, v in case.make_inputs().items()}
    on_device = outputs(case, model.eval(), inputs)
    model.save_pretrained(tmp_path)
    model.to("cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(outputs(case, model), on_device.cpu(), atol=1e-4, rtol=1e-4)
    loaded = PeftModel.from_pretrained(case.make_model().to(device), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {device}
    torch.testing.assert_close(outputs(case, loaded.eval(), inputs), on_device, atol=1e-4, rtol=1e-4)
