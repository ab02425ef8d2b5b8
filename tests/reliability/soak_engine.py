"""The concurrency soak shared by ``test_concurrency_soak.py`` (CI size) and ``benchmarks/soak.py`` (full size).

What runs concurrently, and why it is sound:

* a **per-thread** model (built with ``USE_UNIQUE_THREAD=0``): every worker thread owns
  some adapters of several tuner types and, before each forward, switches among them at random with
  ``set_active_adapters``, ``activate_adapter`` and ``deactivate_adapter``. Activation is thread-local, so
  no worker sees another's choice. Offload is refused in this mode by design (it would move weights that
  other threads may be using).
* a **shared-mode** model: one adapter stays active and every worker runs forwards through it, while an
  offloader thread moves the *inactive* adapters of the same layers to ``'cpu'`` / ``'meta'`` and back, and
  reads them (``adapter_state_dict`` restores and re-offloads an offloaded adapter). Inactive adapters
  never take part in a forward, so their weights may move under running forwards.

Every output is compared bit for bit with a single-thread reference computed on separately built models
(same seeds) under a lock, and every offloaded adapter's weights with a copy taken before the run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch
from peft import LoraConfig

from peft_swift_ext import AdapterConfig, LoraPlusConfig, Swift, SwiftModel

from ..helpers import randomize_adapter
from ..tiny_models import llama_deep_prompt, llama_inputs, tiny_llama


def _configs(index: int):
    """The tuner type of a thread's ``index``-th adapter: they rotate over types that coexist in one model."""
    kinds = [
        lambda: LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        lambda: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=4),
        lambda: LoraPlusConfig(r=2, target_modules=["o_proj"]),
        lambda: LoraConfig(r=2, target_modules=["down_proj"], use_dora=True, init_lora_weights=False),
        lambda: llama_deep_prompt(2),
    ]
    return kinds[index % len(kinds)]()


def thread_adapters(threads: int, per_thread: int) -> list[list[str]]:
    return [[f"t{t}_{j}" for j in range(per_thread)] for t in range(threads)]


@contextlib.contextmanager
def _use_unique_thread(value: str):
    """Set SWIFT's ``USE_UNIQUE_THREAD`` while a model is built, and put the previous value back."""
    previous = os.environ.get("USE_UNIQUE_THREAD")
    os.environ["USE_UNIQUE_THREAD"] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ["USE_UNIQUE_THREAD"]
        else:
            os.environ["USE_UNIQUE_THREAD"] = previous


def build_per_thread_model(threads: int, per_thread: int, per_thread_mode: bool) -> SwiftModel:
    """All threads' adapters in one model; the same seeds give the same weights on every build.

    The mode comes from ``USE_UNIQUE_THREAD`` (``0`` for the per-thread model), as SWIFT users set it.
    """
    names = [name for group in thread_adapters(threads, per_thread) for name in group]
    configs = {name: _configs(i + int(name.split("_")[1])) for i, name in enumerate(names)}
    with _use_unique_thread("0" if per_thread_mode else "1"):
        model = Swift.prepare_model(tiny_llama(), configs)
    if model.activation.per_thread != per_thread_mode:
        raise RuntimeError(f"USE_UNIQUE_THREAD did not select per_thread={per_thread_mode}")
    for seed, name in enumerate(names):
        randomize_adapter(model, name, seed=seed)
    model.set_active_adapters([])
    return model.eval()


SHARED_ACTIVE = "kept"


def build_shared_model(offloadable: int) -> SwiftModel:
    """One adapter that stays active, and ``offloadable`` inactive ones on the same layers."""
    configs = {SHARED_ACTIVE: _configs(0)}
    configs.update({f"off{i}": _configs(i) for i in range(offloadable)})
    model = Swift.prepare_model(tiny_llama(seed=3), configs, per_thread=False)
    for seed, name in enumerate(configs):
        randomize_adapter(model, name, seed=100 + seed)
    model.set_active_adapters([SHARED_ACTIVE])
    return model.eval()


def _rss() -> int:
    """Resident memory after a full collection, with free heap handed back to the OS.

    glibc keeps freed blocks (and one arena per thread that ever ran) mapped, so without the trim RSS moves
    with whatever the allocator happens to keep, in both directions; live objects, a leak included, stay.
    """
    import ctypes

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass
    return psutil.Process().memory_info().rss


@dataclass
class SoakResult:
    forwards: int = 0
    shared_forwards: int = 0
    switches: int = 0
    offloads: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0

    @property
    def rss_growth(self) -> float:
        return self.rss_after / self.rss_before - 1


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def run_soak(threads: int = 8, forwards: int = 500, per_thread: int = 2, offloadable: int = 3, seed: int = 0):
    """Run the soak and return a :class:`SoakResult` (mismatches and errors are collected, not raised)."""
    torch.set_num_threads(1)  # the concurrency under test is Python threads, not intra-op parallelism
    result = SoakResult()
    groups = thread_adapters(threads, per_thread)
    model = build_per_thread_model(threads, per_thread, per_thread_mode=True)
    shared = build_shared_model(offloadable)
    inputs = [{**llama_inputs(batch=1, length=8, seed=t), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
              for t in range(threads)]  # fmt: skip

    # single-thread references, on separately built models, computed once per (thread, ordered active set)
    reference_model = build_per_thread_model(threads, per_thread, per_thread_mode=False)
    references: dict[tuple, torch.Tensor] = {}
    reference_lock = threading.Lock()

    def reference(thread: int, active: tuple[str, ...]) -> torch.Tensor:
        with reference_lock:
            key = (thread, active)
            if key not in references:
                reference_model.set_active_adapters(list(active))
                references[key] = _logits(reference_model, inputs[thread])
            return references[key]

    shared_reference = {t: _logits(shared, inputs[t]) for t in range(threads)}
    offload_names = [name for name in shared.adapters if name != SHARED_ACTIVE]
    saved = {name: {k: v.clone() for k, v in shared.adapter_state_dict(name).items()} for name in offload_names}

    # warm up every code path once so that lazily allocated buffers are counted in "before"
    for t in range(threads):
        model.set_active_adapters(groups[t])
        _logits(model, inputs[t])
        reference(t, tuple(groups[t]))
    model.set_active_adapters([])
    result.rss_before = _rss()

    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    counter_lock = threading.Lock()

    def worker(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        own = groups[t]
        try:
            barrier.wait()
            for i in range(forwards):
                op = rng.random()
                if op < 0.4:
                    model.set_active_adapters(rng.sample(own, rng.randint(0, len(own))))
                elif op < 0.7:
                    model.activate_adapter(rng.choice(own))
                else:
                    model.deactivate_adapter(rng.choice(own))
                active = tuple(model.active_adapters)
                if not set(active) <= set(own):
                    result.mismatches.append(f"thread {t} sees adapters {active} it never activated")
                out = _logits(model, inputs[t])
                if not torch.equal(out, reference(t, active)):
                    result.mismatches.append(f"thread {t} forward {i} with {active} differs")
                if i % 4 == 0:
                    if not torch.equal(_logits(shared, inputs[t]), shared_reference[t]):
                        result.mismatches.append(f"thread {t} forward {i} on the shared model differs")
                    with counter_lock:
                        result.shared_forwards += 1
                with counter_lock:
                    result.forwards += 1
                    result.switches += 1
        except Exception as error:  # collected so the soak reports every failure, not just the first
            result.errors.append(f"thread {t}: {type(error).__name__}: {error}")

    def offloader() -> None:
        rng = random.Random(seed)
        # half the adapters go to 'cpu', half to 'meta'; an adapter once offloaded stays so (only activation,
        # which would change every thread's outputs in shared mode, brings one back for good)
        kinds = {name: ("cpu", "meta")[i % 2] for i, name in enumerate(offload_names)}
        offloaded: set[str] = set()
        try:
            barrier.wait()
            while not stop.is_set():
                name = rng.choice(offload_names)
                if name not in offloaded:
                    shared.deactivate_adapter(name, offload=kinds[name])
                    offloaded.add(name)
                    continue
                # reading an offloaded adapter restores it, copies it and offloads it again: one full cycle
                state = shared.adapter_state_dict(name)
                if any(not torch.equal(state[k], v) for k, v in saved[name].items()):
                    result.mismatches.append(f"offloaded adapter {name} came back changed")
                result.offloads += 1
        except Exception as error:
            result.errors.append(f"offloader: {type(error).__name__}: {error}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    mover = threading.Thread(target=offloader)
    start = time.perf_counter()
    for thread in (*pool, mover):
        thread.start()
    for thread in pool:
        thread.join()
    stop.set()
    mover.join()
    result.seconds = time.perf_counter() - start

    if shared.active_adapters != [SHARED_ACTIVE]:
        result.mismatches.append(f"shared model's active set changed to {shared.active_adapters}")
    for name in offload_names:  # back in place, bit-exact
        shared.activate_adapter(name)
        state = shared.adapter_state_dict(name)
        if any(not torch.equal(state[k], v) for k, v in saved[name].items()):
            result.mismatches.append(f"adapter {name} restored after the soak differs")
    shared.set_active_adapters([SHARED_ACTIVE])
    result.rss_after = _rss()
    return result
