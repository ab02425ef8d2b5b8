"""Context-local activation: ``with model.adapters(...)`` (PeftModel) / ``active_adapters_scope`` (SwiftModel).

Concurrent asyncio tasks and threads each see their own adapters on one model: a soak of 64 tasks x 50 requests
with random adapters gives the single-request reference for every request.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch
from peft import get_peft_model

from peft_swift_ext import AdapterConfig, LongLoraConfig, LoraPlusConfig, SideConfig, Swift

from ..helpers import randomize_adapter
from ..tiny_models import tiny_llama

NAMES = ["a", "b", "c"]


def _peft_model():
    model = get_peft_model(tiny_llama(num_layers=1), AdapterConfig(dim=32, target_modules=["mlp"]), adapter_name="a")
    for name in NAMES[1:]:
        model.add_adapter(name, AdapterConfig(dim=32, target_modules=["mlp"]))
    for seed, name in enumerate(NAMES):
        randomize_adapter(model, name, seed)
    return model.eval()


def _lora_plus_model():
    # PEFT's own LoRA layers: a scope reaches them through their active-adapter lists
    def config():
        return LoraPlusConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(tiny_llama(num_layers=1), config(), adapter_name="a")
    for name in NAMES[1:]:
        model.add_adapter(name, config())
    for seed, name in enumerate(NAMES):
        randomize_adapter(model, name, seed)
    return model.eval()


def _swift_model():
    model = Swift.prepare_model(
        tiny_llama(num_layers=1),
        {
            "a": LoraPlusConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
            "b": AdapterConfig(dim=32, target_modules=["mlp"]),
            "c": SideConfig(dim=32, target_modules=["mlp"], side_module_name="mlp"),
        },
    )
    for seed, name in enumerate(NAMES):
        randomize_adapter(model, name, seed)
    return model.eval()


def _scope(model, names):
    return model.adapters(*names) if hasattr(model.base_model, "adapters") else model.active_adapters_scope(*names)


def _activate(model, names) -> None:
    """Make ``names`` the model's active adapters the ordinary (process-wide) way."""
    if hasattr(model, "set_active_adapters"):
        model.set_active_adapters(list(names))
    elif names:
        model.base_model.set_adapter(list(names))
        model.base_model.enable_adapter_layers()
    else:
        model.base_model.disable_adapter_layers()


BUILDS, BUILD_IDS = [_peft_model, _lora_plus_model, _swift_model], ["peft", "peft-loraplus", "swift"]


def _references(model, inputs: list[torch.Tensor]) -> dict:
    """Every (adapter set, input) pair computed one at a time with those adapters activated (no scopes)."""
    refs = {}
    for names in [(), *[(n,) for n in NAMES], ("a", "b")]:
        _activate(model, names)
        with torch.no_grad():
            for i, ids in enumerate(inputs):
                refs[names, i] = model(input_ids=ids).logits
    _activate(model, ["a"])
    return refs


@pytest.mark.parametrize(
    "build", [_peft_model, _lora_plus_model, _swift_model], ids=["peft", "peft-loraplus", "swift"]
)
def test_scope_is_local_to_the_block_and_leaves_the_active_set_alone(build):
    model = build()
    ids = torch.arange(6)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with _scope(model, ["b"]):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, inside)
    with pytest.raises(ValueError, match="unknown adapter"):
        with _scope(model, ["nope"]):
            pass


@pytest.mark.parametrize(
    "build", [_peft_model, _lora_plus_model, _swift_model], ids=["peft", "peft-loraplus", "swift"]
)
def test_64_concurrent_tasks_and_threads_each_see_their_own_adapters(build):
    model = build()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 128, (1, 6), generator=generator) for _ in range(4)]
    refs = _references(model, inputs)
    assert len({refs[names, 0].sum().item() for names in [(), ("a",), ("b",), ("c",)]}) == 4  # adapters differ
    mismatches, done = [], []
    lock = threading.Lock()

    def forward(names, i):
        with torch.no_grad():
            return model(input_ids=inputs[i]).logits

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(50):
            names = rng.choice([(), *[(n,) for n in NAMES], ("a", "b")])
            i = rng.randrange(len(inputs))
            with _scope(model, names):
                await asyncio.sleep(0)  # let other tasks enter their own scopes in between
                if rng.random() < 0.3:
                    logits = await asyncio.to_thread(forward, names, i)  # the scope travels with the context
                else:
                    logits = forward(names, i)
            with lock:
                done.append(1)
                if not torch.equal(logits, refs[names, i]):
                    mismatches.append((names, i))

    async def main() -> None:
        await asyncio.gather(*(client(seed) for seed in range(64)))

    asyncio.run(main())
    assert len(done) == 64 * 50
    assert not mismatches, f"{len(mismatches)} requests saw another request's adapters: {mismatches[:5]}"


@pytest.mark.parametrize(
    "build", [_peft_model, _lora_plus_model, _swift_model], ids=["peft", "peft-loraplus", "swift"]
)
def test_a_task_started_in_a_scope_keeps_its_adapters_after_the_block_ends(build):
    # contextvars semantics: a task copies its context when created, so it runs the block's adapters even when
    # it runs after the block has closed and no other block is open anywhere in the process
    model = build()
    ids = torch.arange(6)[None]
    refs = _references(model, [ids])

    async def forward() -> torch.Tensor:
        await asyncio.sleep(0)
        with torch.no_grad():
            return model(input_ids=ids).logits

    async def main() -> torch.Tensor:
        with _scope(model, ["b"]):
            task = asyncio.create_task(forward())
        return await task

    assert torch.equal(asyncio.run(main()), refs[("b",), 0])
    assert not torch.equal(refs[("b",), 0], refs[("a",), 0])


def test_a_scope_reaches_longlora_layers_and_its_trained_copies():
    # LongLoRA trains embedding / norm copies (modules_to_save) beside its LoRA layers: a scope selects both
    def config():
        return LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(tiny_llama(num_layers=1), config(), adapter_name="a")
    model.add_adapter("b", config())
    for seed, name in enumerate(["a", "b"]):
        randomize_adapter(model, name, seed)
    model.eval()
    ids = torch.arange(6)[None]
    with torch.no_grad():
        model.set_adapter("b")
        only_b = model(input_ids=ids).logits
        model.set_adapter("a")
        only_a = model(input_ids=ids).logits
        with model.adapters("b"):
            scoped = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(scoped, only_b) and torch.equal(after, only_a)
    assert not torch.equal(only_a, only_b)
