"""Loads that leave the model as it was unless they succeed, convert without silent corruption, and refuse
resource bombs (huge ranks, catastrophic regexes) before they cost memory or time.

References are computed another way: the base model's own state before the load, a plain LoRA config of the
same checkpoint, or the adapter's tensors as saved.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from peft_swift_ext import LisaConfig, Swift, SwiftModel

from ..helpers import base_of, randomize_adapter, state_hash
from ..tiny_models import llama_inputs, tiny_llama
from ._forking import run_in_child

SAFE = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(path, type(module).__name__) for path, module in model.named_modules()]


def snapshot(model: torch.nn.Module) -> tuple:
    """Every module's place and type, and every key, shape, dtype and value."""
    return structure(model), state_hash(model)


def saved_lora(root: Path, name: str = "a", **config) -> Path:
    """A checkpoint of one randomised LoRA adapter on ``tiny_llama``; returns the adapter's folder."""
    fields = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    model = Swift.prepare_model(tiny_llama(), {name: LoraConfig(**fields)})
    randomize_adapter(model, name, seed=3)
    model.save_pretrained(root)
    return root / name


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))


def add_unexpected_key(folder: Path) -> None:
    weights = load_file(str(folder / SAFE))
    weights["bogus.key"] = torch.zeros(1)
    save_file(weights, str(folder / SAFE))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**llama_inputs()).logits


# --- initialisers that rewrite the base model ---------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_load_never_runs_an_initialiser_that_rewrites_the_base(init, tmp_path):
    folder = saved_lora(tmp_path / "ckpt")
    expected = logits(Swift.from_pretrained(tiny_llama(), tmp_path / "ckpt"))  # the same weights, plain init
    edit_config(folder, init_lora_weights=init)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = Swift.from_pretrained(base, tmp_path / "ckpt")
    after = {re.sub(r"\.base_layer", "", k): v for k, v in base_of(loaded).state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(loaded), expected)
    assert loaded.peft_config["a"].init_lora_weights == init  # kept for saving


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_refused_load_with_a_base_rewriting_initialiser_leaves_the_base_unchanged(init, tmp_path):
    folder = saved_lora(tmp_path / "ckpt")
    edit_config(folder, init_lora_weights=init)
    add_unexpected_key(folder)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="bogus.key"):
        Swift.from_pretrained(base, tmp_path / "ckpt")
    assert snapshot(base) == before


def test_a_refused_load_with_trainable_tokens_restores_structure_and_keys(tmp_path):
    folder = saved_lora(tmp_path / "ckpt", trainable_token_indices=[1, 2])
    add_unexpected_key(folder)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="bogus.key"):
        Swift.from_pretrained(base, tmp_path / "ckpt")
    assert snapshot(base) == before


def test_deleting_a_trainable_tokens_adapter_restores_the_embedding(tmp_path):
    saved_lora(tmp_path / "ckpt", trainable_token_indices=[1, 2])
    base = tiny_llama()
    before = snapshot(base)
    loaded = Swift.from_pretrained(base, tmp_path / "ckpt")
    loaded.delete_adapter("a")
    assert snapshot(base_of(loaded)) == before


def test_a_load_whose_injection_replaces_a_base_tensor_is_refused_and_undone(tmp_path, monkeypatch):
    """Any initialiser, known or not, that swaps a base tensor (``weight.data = ...``) is caught and undone."""
    saved_lora(tmp_path / "ckpt")
    real_update = LoraLayer.update_layer

    def rewriting_update(self, adapter_name, *args, **kwargs):
        real_update(self, adapter_name, *args, **kwargs)
        self.get_base_layer().weight.data = torch.zeros_like(self.get_base_layer().weight)

    monkeypatch.setattr(LoraLayer, "update_layer", rewriting_update)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="replaced base-model tensors"):
        Swift.from_pretrained(base, tmp_path / "ckpt")
    assert snapshot(base) == before


# --- extra states beside the adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.base_layer.weight"]
)
def test_extra_states_under_a_module_an_adapter_wraps_are_loaded(key, tmp_path):
    saved_lora(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "extra_states").mkdir()
    value = torch.full((32, 32), 0.25)
    save_file(
        {key: value, "model.norm.weight": torch.full((32,), 2.0)}, str(tmp_path / "ckpt" / "extra_states" / SAFE)
    )
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path / "ckpt")
    state = base_of(loaded).state_dict()
    assert torch.equal(state["model.layers.0.self_attn.q_proj.base_layer.weight"], value)
    assert torch.equal(state["model.norm.weight"], torch.full((32,), 2.0))


# --- SWIFT -> PEFT conversion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight", "lora_A", "default"])
def test_conversion_of_an_adapter_named_like_a_key_segment_loads_exactly_in_peft(name, tmp_path):
    folder = saved_lora(tmp_path / "swift", name=name, modules_to_save=["lm_head"])
    saved = load_file(str(folder / SAFE))
    Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "peft")
    peft_dir = tmp_path / "peft" if name == "default" else tmp_path / "peft" / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_llama(), peft_dir)
    # PEFT only warns about keys it could not place ("Found missing adapter keys ...")
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]
    lora_keys = [key for key in saved if ".lora_" in key]
    assert lora_keys
    for key in lora_keys:  # model.layers.0.self_attn.q_proj.lora_A.<name>.weight
        path, container, _, rest = re.match(r"(.*)\.(lora_[AB])\.([^.]+)\.(\w+)$", key).groups()
        layer = base_of(peft_model).get_submodule(path)
        assert torch.equal(getattr(getattr(layer, container)["default"], rest), saved[key]), key
    head = base_of(peft_model).lm_head
    assert torch.equal(head.modules_to_save["default"].weight, saved["lm_head.weight"])


# --- resource bombs -----------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load_under_a_memory_limit(root: str, headroom: int) -> tuple[str, int]:
    """In a child: allow ``headroom`` more bytes of data segment, load, return (outcome, peak RSS growth)."""
    limit = _status("VmData") + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    model = tiny_llama()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size
    start = _status("VmRSS")
    try:
        Swift.from_pretrained(model, root)
        outcome = "loaded"
    except ValueError as error:
        outcome = f"ValueError: {error}"
    return outcome, _status("VmHWM") - start


@pytest.mark.parametrize("rank", [2**20, 10**7])
def test_a_huge_rank_beside_a_small_file_is_refused_before_allocating(rank, tmp_path):
    folder = saved_lora(tmp_path / "ckpt")
    edit_config(folder, r=rank)
    # ~1.8 GB (2**20) or ~20 GB (10**7) if the adapter were built; the child may allocate 512 MiB at most
    result = run_in_child(load_under_a_memory_limit, str(tmp_path / "ckpt"), 512 * 2**20)
    assert result.error is None, result.error
    outcome, growth = result.value
    assert outcome.startswith("ValueError") and str(folder) in outcome and "mismatched" in outcome, outcome
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB while refusing"


def load_outcome(root: str) -> str:
    try:
        model = Swift.from_pretrained(tiny_llama(), root)
    except ValueError as error:
        return f"ValueError: {error}"
    return "loaded: " + ",".join(sorted(p for p, m in base_of(model).named_modules() if isinstance(m, LoraLayer)))


REDOS = r"(\w+\.?)+q_proj"  # exponential for Python's re on names that do not end in q_proj


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"target_modules": REDOS}, "loaded"),
        ({"target_modules": r".*self_attn\.\w_proj", "exclude_modules": r"(\w+\.?)+[kov]_proj"}, "loaded"),
        ({"rank_pattern": {REDOS: 4}}, "loaded"),
        ({"target_modules": r"(.*?){20}[^j]"}, "did not finish matching"),
        ({"modules_to_save": [r"(a+)+b"]}, "must list module names"),
    ],
    ids=["target", "exclude", "rank_pattern", "unbounded", "modules_to_save"],
)
def test_catastrophic_regexes_are_matched_in_bounded_time_or_refused(fields, expected, tmp_path):
    folder = saved_lora(tmp_path / "ckpt", target_modules=["q_proj"])
    edit_config(folder, **fields)
    result = run_in_child(load_outcome, str(tmp_path / "ckpt"), timeout=60)  # a guard against a hang
    assert not result.hung, f"loading {fields} did not finish within 60 s"
    assert result.error is None, result.error
    assert result.value.startswith(expected) or expected in result.value, result.value
    if expected == "loaded":
        assert result.value.split(": ")[1] == "model.layers.0.self_attn.q_proj,model.layers.1.self_attn.q_proj"
    else:
        assert str(folder / CONFIG) in result.value


def test_rank_pattern_keeps_its_meaning_after_rewriting(tmp_path):
    folder = saved_lora(tmp_path / "ckpt", target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path / "ckpt")
    ranks = {p: m.r["a"] for p, m in base_of(loaded).named_modules() if isinstance(m, LoraLayer)}
    assert ranks == {
        f"model.layers.{i}.self_attn.{m}": (2 if m == "v_proj" else 4) for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    assert loaded.peft_config["a"].rank_pattern == {"v_proj": 2}
    shutil.rmtree(folder.parent)


# --- config values that silently break training ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": 10**30}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": float("nan")}, "lora_dropout"),
        ({"alora_invocation_tokens": [-1]}, "alora_invocation_tokens"),
    ],
    ids=["alpha-zero", "alpha-huge", "alpha-pattern-zero", "dropout-one", "dropout-nan", "negative-token"],
)
def test_values_that_silently_break_training_are_refused_naming_file_and_field(fields, named, tmp_path):
    folder = saved_lora(tmp_path / "ckpt")
    edit_config(folder, **fields)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError) as error:
        Swift.from_pretrained(base, tmp_path / "ckpt")
    assert str(folder / CONFIG) in str(error.value) and named in str(error.value)
    assert snapshot(base) == before


def test_a_config_file_cannot_make_peft_import_a_module(tmp_path):
    marker = "tests.reliability._imported_by_config"
    folder = saved_lora(tmp_path / "ckpt")
    edit_config(folder, megatron_config={"tensor_model_parallel_size": 1}, megatron_core=marker)
    with pytest.raises(ValueError, match="megatron_config"):
        Swift.from_pretrained(tiny_llama(), tmp_path / "ckpt")
    assert marker not in sys.modules


def test_extra_states_are_undone_when_a_later_step_of_the_load_fails(tmp_path, monkeypatch):
    model = Swift.prepare_model(
        tiny_llama(), {"lora": LoraConfig(r=4, target_modules=["q_proj"]), "lisa": LisaConfig(n_layers=1)}
    )
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "extra_states").mkdir()
    save_file({"model.norm.weight": torch.full((32,), 2.0)}, str(tmp_path / "ckpt" / "extra_states" / SAFE))
    real_load = SwiftModel.load_adapter_weights

    def failing_for_lisa(self, adapter_name, *args, **kwargs):
        if adapter_name == "lisa":  # the in-place adapter loads last, after the extra states
            raise OSError("injected: read error")
        return real_load(self, adapter_name, *args, **kwargs)

    monkeypatch.setattr(SwiftModel, "load_adapter_weights", failing_for_lisa)
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(OSError, match="injected"):
        Swift.from_pretrained(base, tmp_path / "ckpt")
    assert snapshot(base) == before
