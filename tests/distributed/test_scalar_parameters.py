"""``vectorize_scalar_parameters``: Side's 0-d ``side_alpha`` as ``(1,)`` for DeepSpeed, saved 0-d (one process).

DeepSpeed's initial broadcast cannot view a 0-d parameter as bytes; the 2-process ZeRO-2/3 runs of ``side-bert``
in ``test_distributed.py`` train with these helpers. Here: the model computes the same, and every save path of
``save_pretrained_full`` writes the shape ms-swift's checkpoints hold (``[]``) and loads back.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_swift_ext import SideConfig, Swift
from peft_swift_ext.distributed import (
    full_adapter_state_dict,
    restore_scalar_parameters,
    save_pretrained_full,
    vectorize_scalar_parameters,
)

from ..helpers import randomize_adapter
from ..tiny_models import bert_inputs, tiny_bert


def side_config() -> SideConfig:
    return SideConfig(
        dim=32, target_modules=r"encoder\.layer\.\d+\.output", side_module_name="mlp", source_hidden_pos=1
    )


def alphas(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "side_alpha" in n}


def peft_side() -> torch.nn.Module:
    model = get_peft_model(tiny_bert(), side_config())
    randomize_adapter(model, "default", seed=3)
    with torch.no_grad():
        for index, alpha in enumerate(alphas(model).values()):
            alpha.fill_(0.5 + index)  # away from 0, so a wrong blend would show
    return model.eval()


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**bert_inputs()).last_hidden_state


def test_vectorized_alpha_computes_the_same_and_restores():
    model = peft_side()
    before = output(model)
    params = alphas(model)
    values = {n: p.detach().clone() for n, p in params.items()}
    assert params and all(p.shape == () for p in params.values())
    reshaped = vectorize_scalar_parameters(model)
    assert {id(p) for p in reshaped} == {id(p) for p in params.values()}, "the same parameter objects"
    assert all(p.shape == (1,) for p in alphas(model).values())
    torch.testing.assert_close(output(model), before, atol=0, rtol=0)
    assert all(torch.equal(alphas(model)[n].reshape(()), v) for n, v in values.items())
    assert all(p.shape == () for p in restore_scalar_parameters(model))
    assert {n: p.shape for n, p in alphas(model).items()} == {n: () for n in params}
    assert restore_scalar_parameters(model) == [], "nothing left to restore"
    torch.testing.assert_close(output(model), before, atol=0, rtol=0)


def test_peft_save_writes_0d_alpha_and_loads(tmp_path):
    model = peft_side()
    want = output(model)
    vectorize_scalar_parameters(model)
    state = full_adapter_state_dict(model)
    saved_alpha = {k: v for k, v in state.items() if "side_alpha" in k}
    assert saved_alpha and all(v.shape == () for v in saved_alpha.values())
    save_pretrained_full(model, tmp_path)
    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    on_disk_alpha = [v.shape for k, v in on_disk.items() if "side_alpha" in k]
    assert on_disk_alpha == [torch.Size([])] * len(saved_alpha)
    assert all(p.shape == (1,) for p in alphas(model).values()), "saving leaves the model as it was"
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(output(loaded), want, atol=1e-6, rtol=0)


def test_swift_save_writes_0d_alpha_and_loads(tmp_path):
    model = Swift.prepare_model(tiny_bert(), {"side": side_config()})
    randomize_adapter(model, "side", seed=3)
    with torch.no_grad():
        for alpha in alphas(model).values():
            alpha.fill_(1.5)
    model.eval()
    want = output(model)
    vectorize_scalar_parameters(model)
    objects = dict(alphas(model))
    save_pretrained_full(model, tmp_path)
    on_disk = load_file(str(tmp_path / "side" / "adapter_model.safetensors"))
    saved_alpha = {k: v.shape for k, v in on_disk.items() if "alpha" in k}
    assert saved_alpha and set(saved_alpha.values()) == {torch.Size([])}
    assert all(alphas(model)[n] is p and p.shape == (1,) for n, p in objects.items()), "parameters put back"
    loaded = Swift.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(output(loaded), want, atol=1e-6, rtol=0)
