"""``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` of every tuner's model, through both entry points.

A copy behaves exactly as the original — eval outputs, and train outputs under the same seed (dropout, NEFTune
noise, LongLoRA's shifted sparse attention, Res-Tuning's feature probes) — and is independent of it.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

from peft_swift_ext import Swift, SwiftModel
from peft_swift_ext.tuners import LoraPlusConfig

from ..tiny_models import tiny_llama
from .cases import ids, parametrize


def _batch(workflow) -> dict:
    examples = workflow.make_dataset()[:2]
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    batch.pop("labels")
    if "timestep" in batch:
        batch["timestep"] = batch["timestep"][0]
    return batch


def _output(model, batch: dict, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(11)
    with torch.no_grad():
        out = model(**batch)
    for name in ("logits", "sample", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def _copies(model) -> dict:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        # our own file: this trusted round trip needs the full unpickler
        "torch.save": torch.load(buffer, weights_only=False),
    }


@pytest.mark.parametrize(("workflow", "entry"), parametrize(), ids=ids())
def test_copies_give_the_originals_outputs_in_train_and_eval_mode(workflow, entry):
    model = workflow.build(entry)
    batch = _batch(workflow)
    expected = {train: _output(model, batch, train) for train in (False, True)}
    for kind, copied in _copies(model).items():
        assert type(copied) is type(model)
        for train in (False, True):
            torch.testing.assert_close(_output(copied, batch, train), expected[train], atol=0, rtol=0, msg=kind)
    # the copy is independent: changing it leaves the original as it was
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for param in copied.parameters():
            if param.requires_grad:
                param.add_(0.5)
    torch.testing.assert_close(_output(model, batch, False), expected[False], atol=0, rtol=0)


def test_longlora_copy_trains_with_shifted_sparse_attention():
    from peft_swift_ext import LongLoraConfig

    model = Swift.prepare_model(tiny_llama(), {"long": LongLoraConfig(r=4, target_modules=["q_proj"], group_size=4)})
    batch = {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))}
    train = _output(model, batch, True)
    with model.disable_adapter():
        full = _output(model, batch, True)
    assert (train - full).abs().max() > 1e-4  # S²-Attn (and LoRA) change the train-mode output
    for kind, copied in _copies(model).items():
        torch.testing.assert_close(_output(copied, batch, True), train, atol=0, rtol=0, msg=kind)


def test_per_thread_activation_carries_the_copying_threads_set():
    model = Swift.prepare_model(
        tiny_llama(),
        {"a": LoraPlusConfig(r=2, target_modules=["q_proj"]), "b": LoraPlusConfig(r=2, target_modules=["v_proj"])},
        per_thread=True,
    )
    model.set_active_adapters(["b"])
    copied = copy.deepcopy(model)
    assert copied.activation.per_thread and copied.active_adapters == ["b"]
    seen = []
    thread = threading.Thread(target=lambda: seen.append(copied.active_adapters))
    thread.start()
    thread.join()
    assert seen == [[]]  # a new thread starts with none, as on the original
    copied.set_active_adapters(["a"])
    assert model.active_adapters == ["b"]


def test_swift_model_pickles_with_offloaded_adapters():
    model = Swift.prepare_model(
        tiny_llama(),
        {"a": LoraPlusConfig(r=2, target_modules=["q_proj"]), "b": LoraPlusConfig(r=2, target_modules=["v_proj"])},
    )
    model.set_active_adapters(["a"], offload="cpu")
    copied = pickle.loads(pickle.dumps(model))
    assert isinstance(copied, SwiftModel) and copied.offload_store.is_offloaded("b")
    copied.set_active_adapters(["a", "b"])
    model.set_active_adapters(["a", "b"])
    batch = {"input_ids": torch.arange(8)[None]}
    torch.testing.assert_close(_output(copied, batch, False), _output(model, batch, False), atol=0, rtol=0)
