"""Loading and deleting adapters while other threads run forwards with their own adapters (per-thread mode).

A load re-wraps modules, takes other tuner types' layers out of the tree for a moment, and PEFT rewrites each
touched layer's active-adapter list until the model puts its view back. Each worker thread owns one adapter and
compares every output, bit for bit, with a single-thread reference computed before; meanwhile a loader thread
loads a checkpoint (a LoRA on modules inside the Adapter's, and an Adapter on the same MLPs) under new names and
deletes it again, over and over.
"""

from __future__ import annotations

import threading

import torch
from peft import LoraConfig

from peft_swift_ext import AdapterConfig, Swift

from ..helpers import randomize_adapter
from ..tiny_models import llama_inputs, tiny_llama

CYCLES = 12
OWNED = {
    "lora_owner": LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    "adapter_owner": AdapterConfig(dim=32, target_modules=["mlp"], hidden_pos=0, adapter_length=4),
}


def test_loads_and_deletes_leave_other_threads_forwards_exact(tmp_path):
    donor = Swift.prepare_model(
        tiny_llama(),
        {
            "x_lora": LoraConfig(r=2, target_modules=["up_proj", "v_proj"], init_lora_weights=False),
            "x_adapter": AdapterConfig(dim=32, target_modules=["mlp"], hidden_pos=0, adapter_length=2),
        },
    )
    for seed, name in enumerate(donor.adapters):
        randomize_adapter(donor, name, seed=10 + seed)
    donor.save_pretrained(tmp_path / "ckpt")

    model = Swift.prepare_model(tiny_llama(), dict(OWNED), per_thread=True).eval()
    for seed, name in enumerate(OWNED):
        randomize_adapter(model, name, seed=seed)
    inputs = llama_inputs()
    references = {}
    for name in OWNED:
        model.set_active_adapters([name])
        with torch.no_grad():
            references[name] = model(**inputs).logits
    model.set_active_adapters([])
    assert not torch.equal(references["lora_owner"], references["adapter_owner"])

    loading = threading.Event()
    loading.set()
    mismatches, errors, forwards = [], [], []

    def worker(name: str) -> None:
        model.set_active_adapters([name])
        try:
            while loading.is_set():
                with torch.no_grad():
                    output = model(**inputs).logits
                forwards.append(name)
                if not torch.equal(output, references[name]):
                    mismatches.append((name, (output - references[name]).abs().max().item()))
        except BaseException as error:
            errors.append(f"{name}: {type(error).__name__}: {error}")

    def loader() -> None:
        try:
            for cycle in range(CYCLES):
                names = {"x_lora": f"lora{cycle}", "x_adapter": f"adapter{cycle}"}
                Swift.from_pretrained(model, tmp_path / "ckpt", adapter_name=names)
                assert model.active_adapters == list(names.values())  # this thread's own activation
                for new_name in names.values():
                    model.delete_adapter(new_name)
        except BaseException as error:
            errors.append(f"loader: {type(error).__name__}: {error}")
        finally:
            loading.clear()

    threads = [threading.Thread(target=worker, args=(name,)) for name in OWNED for _ in range(2)]
    threads.append(threading.Thread(target=loader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert mismatches == [], f"{len(mismatches)} of {len(forwards)} forwards differed, e.g. {mismatches[:3]}"
    assert len(forwards) >= len(OWNED) * 2  # every worker ran while the loads went on
    assert model.adapters == list(OWNED)
