"""Pairs PEFT can hold itself (two adapters of one type in one PeftModel), in both orders: the same four checks.

(a) each alone = its own model; (b) both active = the inner adapter's model plus the outer adapter's maths;
(c) ``save_pretrained`` -> ``PeftModel.from_pretrained`` / ``load_adapter`` (in the order they were added) gives
identical outputs; (d) deleting one leaves the other exactly as alone.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_swift_ext.core.keys import adapter_tensors

from ..helpers import base_of, randomize_adapter
from .cases import MODELS, PEFT_PAIRS, TUNERS, ordered, outer_of
from .harness import ATOL, VISIBLE, forward


def peft_model(model_key: str, names: list[str]) -> PeftModel:
    model = get_peft_model(MODELS[model_key].build(), TUNERS[names[0]].config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, TUNERS[name].config())
    model.base_model.set_adapter(names)
    return model.eval()


def swift_weights(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {slot.swift_key(name): tensor for slot, (_, tensor) in adapter_tensors(base_of(model), name).items()}


def copy_weights(source: PeftModel, target: PeftModel, name: str) -> None:
    wanted = adapter_tensors(base_of(target), name)
    with torch.no_grad():
        for slot, (_, tensor) in adapter_tensors(base_of(source), name).items():
            wanted.pop(slot)[1].copy_(tensor)
    assert not wanted, f"tensors of {name} the pair does not have: {list(wanted)}"


@pytest.mark.parametrize("case", ordered(PEFT_PAIRS), ids=lambda case: f"{case[1][0]}-then-{case[1][1]}")
def test_peft_pair(case, tmp_path):
    pair, order = case
    model_key = pair.model
    pair_model = peft_model(model_key, list(order))
    for seed, name in enumerate(order):
        randomize_adapter(pair_model, name, seed=seed + 1)
    both = forward(pair_model, model_key)
    alone, alone_out = {}, {}
    for name in order:
        alone[name] = peft_model(model_key, [name])
        copy_weights(pair_model, alone[name], name)
        alone_out[name] = forward(alone[name], model_key)
        pair_model.base_model.set_adapter(name)
        torch.testing.assert_close(forward(pair_model, model_key), alone_out[name], atol=ATOL, rtol=0)  # (a)

    outer = outer_of(pair, order)
    inner = next(name for name in order if name != outer)
    handles = TUNERS[outer].reference(base_of(alone[inner]), swift_weights(pair_model, outer), outer)
    try:
        expected = forward(alone[inner], model_key)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(both, expected, atol=ATOL, rtol=0)  # (b)
    assert all((both - alone_out[name]).abs().max() > VISIBLE for name in order)

    pair_model.save_pretrained(tmp_path)  # (c): PEFT writes non-default adapters into sub-folders
    loaded = PeftModel.from_pretrained(MODELS[model_key].build(), tmp_path / order[0], adapter_name=order[0])
    loaded.load_adapter(tmp_path / order[1], adapter_name=order[1])
    loaded.base_model.set_adapter(list(order))
    loaded.eval()
    assert torch.equal(forward(loaded, model_key), both)

    pair_model.delete_adapter(order[0])  # (d)
    assert torch.equal(forward(pair_model, model_key), alone_out[order[1]])
    loaded.delete_adapter(order[1])
    assert torch.equal(forward(loaded, model_key), alone_out[order[0]])
