"""What Res-Tuning's bypass keeps for backward (the features it reads and its own states, nothing more), and that
recomputing its adapters' hidden activations in backward changes neither outputs nor gradients.

Counted with ``saved_tensors_hooks`` (every tensor autograd or a custom function saves for backward passes through
the pack hook), as bytes of distinct storages that are not parameters, against a bound computed from the config.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_swift_ext import ResTuningConfig
from peft_swift_ext.tuners.restuning import layer
from peft_swift_ext.tuners.restuning.layer import ResAdapter, ResGroupAdapter

from ..helpers import randomize_adapter
from ..tiny_models import tiny_vit, vit_inputs


def saved_storages(model: torch.nn.Module, run) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Storage address -> (bytes, shape of the first tensor seen on it) of what ``run()`` saves for backward,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


def test_one_step_saves_only_the_features_and_the_bypass_states():
    depth, batch = 4, 3
    model = get_peft_model(
        tiny_vit(num_layers=depth),
        ResTuningConfig(
            dims=32, root_modules=r"layers\.0", stem_modules=r"layers\.\d+", target_modules="layernorm",
            tuner_cfg="res_adapter",
        ),
    )  # fmt: skip
    randomize_adapter(model, "default", seed=0, scale=0.1)
    model.train()
    inputs = vit_inputs(batch=batch)
    outputs = []
    saved = saved_storages(model, lambda: outputs.append(model(**inputs).last_hidden_state))
    tokens, width = outputs[0].shape[1:]
    feature = batch * tokens * width * 4  # one (batch, tokens, width) float32 tensor
    # Needed by any bypass: the root feature and every stem feature (ln1's weight gradients of the lateral tuners,
    # and the first vertical one), the bypass state after each block (the next vertical tuner's input; the last
    # one is the final norm's input), and the norm's mean and 1/std per token.
    bound = (1 + depth + depth) * feature + 2 * batch * tokens * 4
    # Without recomputation, each of the 2 * depth adapters also kept ln1(x) and GELU(ln1(x)) (adapter_length = 32
    # channels per token each): 2 * 2 * depth more feature-sized tensors.
    assert sum(nbytes for nbytes, _ in saved.values()) <= bound, saved
    # what backward needs is still saved, so the bound is not met by losing track of tensors
    assert len([nbytes for nbytes, _ in saved.values() if nbytes == feature]) == 2 * depth + 1, saved
    F.mse_loss(outputs[0], torch.zeros_like(outputs[0])).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "restuning_bypass" in n)


@pytest.mark.parametrize("kind", ["res_adapter", "res_group_adapter"])
def test_an_adapter_saves_only_its_input_storage(kind):
    torch.manual_seed(0)
    if kind == "res_adapter":
        adapter, x = ResAdapter(16, 8, None, zero_init=False), torch.randn(2, 5, 16)
    else:
        # 4-D features: the channel groups are a permuted view, which plain linear layers would copy and keep
        adapter, x = ResGroupAdapter(16, None, 4, 2, None, zero_init=False), torch.randn(2, 16, 3, 3)
    x.requires_grad_()
    outputs = []
    saved = saved_storages(adapter, lambda: outputs.append(adapter(x)))
    assert set(saved) == {x.untyped_storage().data_ptr()}
    outputs[0].square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in adapter.parameters())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["res_adapter", "res_adapter_4d", "res_group_adapter"])
def test_recomputation_gives_the_plain_mlps_outputs_and_gradients(kind, autocast):
    torch.manual_seed(0)
    if kind == "res_group_adapter":
        adapter, x0 = ResGroupAdapter(16, None, 4, 2, None, zero_init=False), torch.randn(2, 16, 3, 3)
    else:
        adapter = ResAdapter(16, 8, None, zero_init=False)
        x0 = torch.randn(2, 16, 3, 3) if kind == "res_adapter_4d" else torch.randn(2, 5, 16)

    def plain_mlp(x: torch.Tensor) -> torch.Tensor:  # what the adapter computed before, through autograd
        return adapter.ln2(F.gelu(adapter.ln1(x)))

    results = []
    for mlp in ("recomputed", "plain"):
        x = x0.clone().requires_grad_()
        adapter.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if mlp == "plain":
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(layer, "adapter_mlp", lambda tokens, ln1, ln2: plain_mlp(tokens))
                    out = adapter(x)
            else:
                out = adapter(x)
        out.float().square().mean().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in adapter.parameters())])
    for recomputed, plain in zip(*results):
        assert torch.equal(recomputed, plain)
