"""Every two tuners that meet on one module (or nested ones), added in both orders, through SwiftModel.

For each pair and order, with randomised adapter weights:
(a) each adapter active alone gives what that adapter gives on its own model;
(b) both active give the composition computed by hand: the inner adapter's own model plus the outer adapter's
    maths written out from its formula (``references.py``);
(c) ``save_pretrained`` -> ``Swift.from_pretrained`` on a fresh base gives identical outputs, both active and alone;
(d) deleting one adapter leaves the other exactly as it is alone;
(e) merging either one (eval-mode pairs) is refused before anything changes, or leaves the outputs as they were.
"""

from __future__ import annotations

import pytest
import torch

from peft_swift_ext import Swift

from ..helpers import state_hash
from .cases import MODELS, PAIRS, TUNERS, ordered, outer_of
from .harness import ATOL, VISIBLE, build, equal, forward, randomized, reference


def _id(case) -> str:
    pair, order = case
    return f"{order[0]}-then-{order[1]}"


@pytest.mark.parametrize("case", ordered(PAIRS), ids=_id)
def test_pair(case, tmp_path):
    pair, order = case
    model_key = pair.model
    training = any(TUNERS[name].training for name in order)
    pair_model, weights = randomized(model_key, list(order), training)
    alone = {name: build(model_key, [name], training, weights) for name in order}
    assert pair_model.active_adapters == list(order)
    both = forward(pair_model, model_key)
    base = forward(MODELS[model_key].build().train(training), model_key)

    # (a) each adapter alone
    alone_out = {}
    for name in order:
        alone_out[name] = forward(alone[name], model_key)
        assert (alone_out[name] - base).abs().max() > VISIBLE, f"{name} barely changes the output"
        pair_model.set_active_adapters([name])
        torch.testing.assert_close(forward(pair_model, model_key), alone_out[name], atol=ATOL, rtol=0)

    # (b) both active = the inner adapter's model with the outer adapter's maths around it
    outer = outer_of(pair, order)
    inner = next(name for name in order if name != outer)
    expected = reference(model_key, inner, outer, weights, training)
    torch.testing.assert_close(both, expected, atol=ATOL, rtol=0)
    for name in order:
        assert (both - alone_out[name]).abs().max() > VISIBLE, f"with both active, {name}'s partner has no effect"

    # (c) save -> load into a fresh base: the same model, both active and each alone
    pair_model.set_active_adapters(list(order))
    pair_model.save_pretrained(tmp_path)
    loaded = Swift.from_pretrained(MODELS[model_key].build(), tmp_path).train(training)
    assert loaded.adapters == list(order) and loaded.active_adapters == list(order)
    equal(forward(loaded, model_key), both, "reloaded, both active")
    for name in order:
        loaded.set_active_adapters([name])
        pair_model.set_active_adapters([name])
        equal(forward(loaded, model_key), forward(pair_model, model_key), f"reloaded, {name} alone")

    # (d) deleting one adapter leaves the other exactly as alone (in the original and in the reloaded model)
    for model, deleted in ((pair_model, order[0]), (loaded, order[1])):
        kept = next(name for name in order if name != deleted)
        model.set_active_adapters(list(order))
        model.delete_adapter(deleted)
        assert model.adapters == [kept] and model.active_adapters == [kept]
        assert repr(model.model) == repr(alone[kept].model), f"deleting {deleted} left another structure"
        equal(forward(model, model_key), alone_out[kept], f"{kept} after deleting {deleted}")

    # (e) merging one adapter into the base weights never silently changes what the model computes
    for name in order if not training else ():
        model = Swift.from_pretrained(MODELS[model_key].build(), tmp_path).eval()
        before = state_hash(model.model)
        try:
            model.merge(adapter_names=[name])
        except ValueError:
            assert state_hash(model.model) == before, f"refusing to merge {name} changed the model"
            equal(forward(model, model_key), both, f"after refusing to merge {name}")
            continue
        torch.testing.assert_close(forward(model, model_key), both, atol=ATOL, rtol=0)
