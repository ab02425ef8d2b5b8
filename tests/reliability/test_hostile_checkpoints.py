"""Hostile and broken checkpoints: each is refused with an error naming the file and the problem, no code
runs, and the model it was loaded into is unchanged.

Every case goes through ``Swift.from_pretrained``; where PEFT's own loader reads the same files
(``PeftModel.from_pretrained``) the test records what PEFT does, which docs/reliability.md reports.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import typing
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_swift_ext import Swift

from ..contract.cases import ALL_CASES
from ..tiny_models import tiny_llama
from ._common import WEIGHTED_CASES, copy_checkpoint, lora, snapshot, swift_model_of

SAFE = "adapter_model.safetensors"
CASES_BY_ID = {case.id: case for case in ALL_CASES}


@pytest.fixture(scope="module")
def swift_ckpt(tmp_path_factory) -> Path:
    """A SWIFT-layout checkpoint with one LoRA adapter ``a``."""
    root = tmp_path_factory.mktemp("swift_ckpt")
    Swift.prepare_model(tiny_llama(), {"a": lora()}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def peft_ckpt(tmp_path_factory) -> Path:
    """A PEFT-layout checkpoint (adapter at the root) of the same LoRA."""
    root = tmp_path_factory.mktemp("peft_ckpt")
    get_peft_model(tiny_llama(), lora()).save_pretrained(root)
    return root


_case_ckpts: dict[str, Path] = {}


@pytest.fixture(scope="module")
def case_ckpt(tmp_path_factory):
    """SWIFT-layout checkpoint of adapter ``first`` for a contract case, written once per case."""

    def get(case) -> Path:
        if case.id not in _case_ckpts:
            root = tmp_path_factory.mktemp(case.id)
            swift_model_of(case).save_pretrained(root)
            _case_ckpts[case.id] = root
        return _case_ckpts[case.id]

    return get


def loaded_target() -> object:
    """A SwiftModel already holding adapter ``keep``: a failed load must leave it exactly as it is."""
    model = Swift.prepare_model(tiny_llama(), {"keep": lora(["o_proj"])})
    model.set_active_adapters(["keep"])
    return model


def assert_refused_unchanged(target, folder: Path, pattern: str, **kwargs) -> ValueError:
    """``Swift.from_pretrained`` raises ValueError naming ``folder`` and matching ``pattern``; nothing changes."""
    before = snapshot(target)
    with pytest.raises(ValueError, match=pattern) as info:
        Swift.from_pretrained(target, folder, **kwargs)
    assert snapshot(target) == before
    return info.value


# --- damaged safetensors files -----------------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: os.urandom(64),
    "empty": lambda data: b"",
    # a header length of 1 TB: a reader that trusts it would try to allocate it
    "huge_header_length": lambda data: (10**12).to_bytes(8, "little") + data[8:],
    "header_not_json": lambda data: data[:8] + b"X" + data[9:],
    # the header points the first tensor past the end of the file
    "offsets_out_of_range": lambda data: _shift_offsets(data),
}


def _shift_offsets(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    first = next(key for key in header if key != "__metadata__")
    header[first]["data_offsets"] = [10**9, 10**9 + 64]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_swift_loader_refuses_damaged_safetensors(corruption, swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    weights = folder / "a" / SAFE
    weights.write_bytes(CORRUPTIONS[corruption](weights.read_bytes()))
    error = assert_refused_unchanged(loaded_target(), folder, "is not a readable safetensors file")
    assert str(weights) in str(error)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_peft_loader_raises_on_damaged_safetensors(corruption, peft_ckpt, tmp_path):
    # PEFT's own loader: it raises safetensors' error (without the file name) after injecting the adapter
    # layers, so the base model is left changed; recorded in docs/reliability.md.
    folder = copy_checkpoint(peft_ckpt, tmp_path / "ckpt")
    (folder / SAFE).write_bytes(CORRUPTIONS[corruption]((folder / SAFE).read_bytes()))
    with pytest.raises(Exception, match="deserializ|header|incomplete|out of bounds|invalid"):
        PeftModel.from_pretrained(tiny_llama(), folder)


@pytest.mark.parametrize("corruption", ["truncated", "header_not_json"])
def test_swift_loader_refuses_damaged_peft_layout_safetensors(corruption, peft_ckpt, tmp_path):
    folder = copy_checkpoint(peft_ckpt, tmp_path / "ckpt")
    (folder / SAFE).write_bytes(CORRUPTIONS[corruption]((folder / SAFE).read_bytes()))
    error = assert_refused_unchanged(loaded_target(), folder, "is not a readable safetensors file")
    assert str(folder / SAFE) in str(error)


# --- keys, shapes and dtypes, for every tuner --------------------------------------------------------------------


@pytest.mark.parametrize("case", WEIGHTED_CASES, ids=[case.id for case in WEIGHTED_CASES])
def test_tensor_of_wrong_shape_is_named_and_model_unchanged(case, case_ckpt, tmp_path):
    folder = copy_checkpoint(case_ckpt(case), tmp_path / "ckpt")
    weights = load_file(str(folder / "first" / SAFE))
    key = sorted(weights)[-1]
    weights[key] = torch.zeros(*weights[key].shape, 3)
    save_file(weights, str(folder / "first" / SAFE))
    target = case.make_model()
    assert_refused_unchanged(target, folder, rf"{re.escape(str(folder / 'first'))}.*mismatched keys: {re.escape(key)}")


@pytest.mark.parametrize("case", WEIGHTED_CASES, ids=[case.id for case in WEIGHTED_CASES])
def test_unexpected_key_is_named_and_model_unchanged(case, case_ckpt, tmp_path):
    folder = copy_checkpoint(case_ckpt(case), tmp_path / "ckpt")
    weights = load_file(str(folder / "first" / SAFE))
    save_file({**weights, "planted.weight": torch.zeros(2)}, str(folder / "first" / SAFE))
    assert_refused_unchanged(case.make_model(), folder, r"unexpected keys: planted\.weight")


@pytest.mark.parametrize("case", WEIGHTED_CASES, ids=[case.id for case in WEIGHTED_CASES])
def test_missing_key_into_a_loaded_model_is_named_and_model_unchanged(case, case_ckpt, tmp_path):
    # the contract suite loads into a bare model; here the target already holds an adapter of the same type
    one_per_model = case.not_applicable.get("test_several_adapters_of_one_type")
    if one_per_model:
        pytest.skip(f"not applicable to {case.id}: {one_per_model}")
    folder = copy_checkpoint(case_ckpt(case), tmp_path / "ckpt")
    weights = load_file(str(folder / "first" / SAFE))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(folder / "first" / SAFE))
    target = swift_model_of(case, names=("keep",))
    assert_refused_unchanged(target, folder, rf"missing keys: {re.escape(dropped)}")


@pytest.mark.parametrize("case", WEIGHTED_CASES, ids=[case.id for case in WEIGHTED_CASES])
def test_half_precision_checkpoint_loads_as_its_exact_upcast(case, case_ckpt, tmp_path):
    # fp16 weights for an fp32 adapter are a supported mixed-precision case: each value is upcast exactly
    folder = copy_checkpoint(case_ckpt(case), tmp_path / "ckpt")
    weights = load_file(str(folder / "first" / SAFE))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(folder / "first" / SAFE))
    loaded = Swift.from_pretrained(case.make_model(), folder)
    state = loaded.adapter_state_dict("first")
    for key, value in weights.items():
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert state[key].dtype == value.dtype, key
        torch.testing.assert_close(state[key], expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_tensor_for_a_float_weight_is_refused(dtype, swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    weights = load_file(str(folder / "a" / SAFE))
    save_file({k: (v * 100).to(dtype) for k, v in weights.items()}, str(folder / "a" / SAFE))
    assert_refused_unchanged(loaded_target(), folder, "dtype")


PEFT_CASES = [case for case in WEIGHTED_CASES if "unet" not in case.id]  # UNet builds cost seconds each


@pytest.mark.parametrize("case", PEFT_CASES, ids=[case.id for case in PEFT_CASES])
def test_peft_loader_names_the_key_of_a_wrong_shape(case, tmp_path):
    # PEFT's loader for this package's tuners: torch's size-mismatch error names the key (not the file), and
    # the adapter layers stay injected in the base model
    model = get_peft_model(case.make_model(), case.make_config())
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / SAFE))
    key = sorted(weights)[-1]
    weights[key] = torch.zeros(*weights[key].shape, 3)
    save_file(weights, str(tmp_path / SAFE))
    with pytest.raises(RuntimeError, match=rf"size mismatch for .*{re.escape(key.rsplit('.', 1)[0])}"):
        PeftModel.from_pretrained(case.make_model(), tmp_path)


OWN_CONFIG_CASES = [CASES_BY_ID[name] for name in ("adapter-llama", "prompt-llama", "restuning-vit", "side-bert")]


@pytest.mark.parametrize("case", OWN_CONFIG_CASES, ids=[case.id for case in OWN_CONFIG_CASES])
def test_peft_loader_names_the_field_of_a_wrong_type_in_this_packages_configs(case, tmp_path):
    # the configs' own checks run inside PEFT's loader too: the field is named (the file is not)
    get_peft_model(case.make_model(), case.make_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    field = _field_refusing_objects(type(case.make_config()), config)
    _rewrite_config(tmp_path, {field: {"not": "this type"}})
    target = case.make_model()
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"{type(case.make_config()).__name__}\.{field}"):
        PeftModel.from_pretrained(target, tmp_path)
    assert snapshot(target) == before


# --- adapter_config.json -----------------------------------------------------------------------------------------


def _rewrite_config(folder: Path, change) -> Path:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(change if isinstance(change, str) else json.dumps({**config, **change}))
    return config_file


def _field_refusing_objects(config_cls: type, config: dict) -> str:
    """A set field whose annotation admits no JSON object (so ``{...}`` is a wrong type for it)."""
    hints = typing.get_type_hints(config_cls)
    return next(
        key
        for key, value in sorted(config.items())
        if isinstance(value, (int, float, bool, list))
        and key in hints
        and hints[key] is not typing.Any
        and "dict" not in str(hints[key]).lower()
        and "any" not in str(hints[key]).lower()
    )


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_config_field_of_wrong_type_names_file_and_field(case, case_ckpt, tmp_path):
    folder = copy_checkpoint(case_ckpt(case), tmp_path / "ckpt")
    config = json.loads((folder / "first" / "adapter_config.json").read_text())
    field = _field_refusing_objects(type(case.make_config()), config)
    config_file = _rewrite_config(folder / "first", {field: {"not": "this type"}})
    error = assert_refused_unchanged(case.make_model(), folder, rf"field '{field}'")
    assert str(config_file) in str(error)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "must hold a JSON object, found list"),
        ('{"r": 4}', "neither 'peft_type' nor 'swift_type' is set"),
        (b"\xff\xfe\x00".decode("latin-1"), "cannot read"),
    ],
    ids=["invalid_json", "json_list", "no_type", "not_utf8"],
)
def test_unreadable_config_names_the_file(content, message, swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    config_file = folder / "a" / "adapter_config.json"
    config_file.write_bytes(content.encode("latin-1"))
    error = assert_refused_unchanged(loaded_target(), folder, message)
    assert str(config_file) in str(error)


def test_unknown_peft_type_names_the_file(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    config_file = _rewrite_config(folder / "a", {"peft_type": "NOT_A_TUNER"})
    error = assert_refused_unchanged(loaded_target(), folder, "Unknown peft_type 'NOT_A_TUNER'")
    assert str(config_file) in str(error)


def test_unknown_swift_type_names_the_file(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    config_file = _rewrite_config(folder / "a", {"swift_type": "MYSTERY"})
    error = assert_refused_unchanged(loaded_target(), folder, "unknown swift_type 'MYSTERY'")
    assert str(config_file) in str(error)


def test_unknown_config_fields_warn_naming_the_file_and_load(swift_ckpt, tmp_path):
    # ms-swift configs carry bookkeeping fields this package does not have: ignored with a warning, not refused
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    config_file = _rewrite_config(folder / "a", {"from_a_newer_version": 1})
    with pytest.warns(UserWarning, match=rf"{re.escape(str(config_file))}: ignoring fields .*from_a_newer_version"):
        model = Swift.from_pretrained(tiny_llama(), folder)
    assert model.adapters == ["a"]


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"peft_type": "NOT_A_TUNER"}, "NOT_A_TUNER"),
        ({"r": "eight"}, "not supported|str"),
        ({"target_modules": 3}, "not iterable|int"),
        ("{not json", "Expecting property name"),
        ("[1, 2]", "list indices"),
    ],
    ids=["unknown_peft_type", "r_str", "target_modules_int", "invalid_json", "json_list"],
)
def test_peft_loader_raises_on_broken_config(change, pattern, peft_ckpt, tmp_path):
    # PEFT's own messages (KeyError, TypeError from inside LoraConfig, JSONDecodeError) name neither file nor field
    folder = copy_checkpoint(peft_ckpt, tmp_path / "ckpt")
    _rewrite_config(folder, change)
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises((KeyError, TypeError, ValueError), match=pattern):
        PeftModel.from_pretrained(target, folder)
    assert snapshot(target) == before


# --- folders that escape the checkpoint directory ----------------------------------------------------------------


@pytest.mark.parametrize("new_name", ["../evil", "/tmp/evil", "a/b", "..", "extra_states"])
def test_renaming_to_an_escaping_adapter_name_is_refused(new_name, swift_ckpt, tmp_path):
    assert_refused_unchanged(loaded_target(), swift_ckpt, "adapter name", adapter_name={"a": new_name})


@pytest.mark.parametrize("saved_name", ["../a", "/a", "a/../a"])
def test_selecting_a_path_instead_of_an_adapter_name_is_refused(saved_name, swift_ckpt):
    assert_refused_unchanged(loaded_target(), swift_ckpt, "not found in the checkpoint", adapter_name=saved_name)


def test_adapter_folder_symlinked_outside_is_refused_and_model_unchanged(swift_ckpt, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "evil").symlink_to(swift_ckpt / "a", target_is_directory=True)
    assert_refused_unchanged(loaded_target(), tmp_path / "ckpt", "outside the checkpoint directory")


def test_extra_states_folder_symlinked_outside_is_refused(swift_ckpt, tmp_path):
    # extra_states overwrites base-model weights, so a folder planted elsewhere must not be followed
    outside = tmp_path / "outside"
    outside.mkdir()
    weight = tiny_llama().state_dict()["model.norm.weight"]
    save_file({"model.norm.weight": torch.full_like(weight, 7.0)}, str(outside / SAFE))
    (outside / "adapter_config.json").write_text(json.dumps({"extra_state_keys": ["model.norm.weight"]}))
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "extra_states").symlink_to(outside, target_is_directory=True)
    assert_refused_unchanged(loaded_target(), folder, "outside the checkpoint directory")


def test_extra_states_with_unknown_key_is_refused_and_model_unchanged(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "extra_states").mkdir()
    save_file({"model.not_a_weight": torch.zeros(2)}, str(folder / "extra_states" / SAFE))
    error = assert_refused_unchanged(loaded_target(), folder, r"unexpected keys \['model\.not_a_weight'\]")
    assert str(folder / "extra_states") in str(error)


def test_adapter_order_naming_outside_folders_is_ignored(swift_ckpt, tmp_path):
    # configuration.json only ranks the adapters found; names in it never become paths
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "configuration.json").write_text(json.dumps({"adapter_order": ["../../etc", "/abs", "a"]}))
    assert Swift.from_pretrained(tiny_llama(), folder).adapters == ["a"]


def test_peft_refuses_adapter_names_with_path_separators(peft_ckpt):
    # PEFT's own guard: a module name cannot contain '.', so '../x' never reaches the file system
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(KeyError, match="contain"):
        PeftModel.from_pretrained(target, peft_ckpt, adapter_name="../evil")
    assert snapshot(target) == before


# --- pickles -----------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(folder: Path, marker: Path) -> None:
    (folder / SAFE).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weight": _Payload(marker)}))


def test_swift_loader_refuses_code_in_a_pickle_and_runs_nothing(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    _plant_pickle(folder / "a", tmp_path / "pwned")
    error = assert_refused_unchanged(loaded_target(), folder, "cannot be loaded safely")
    assert str(folder / "a" / "adapter_model.bin") in str(error)
    assert not (tmp_path / "pwned").exists()


def test_swift_loader_refuses_code_in_an_extra_states_pickle(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "extra_states").mkdir()
    (folder / "extra_states" / SAFE).write_bytes(b"")
    _plant_pickle(folder / "extra_states", tmp_path / "pwned")
    assert_refused_unchanged(loaded_target(), folder, "cannot be loaded safely")
    assert not (tmp_path / "pwned").exists()


def test_pickle_of_something_else_than_tensors_is_refused(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "a" / SAFE).unlink()
    torch.save([torch.zeros(2)], folder / "a" / "adapter_model.bin")
    assert_refused_unchanged(loaded_target(), folder, "does not hold a flat mapping of tensor names to tensors")


def test_peft_loader_refuses_code_in_a_pickle_and_runs_nothing(peft_ckpt, tmp_path):
    # PEFT loads .bin with torch.load(weights_only=True): refused, nothing runs, but the layers stay injected
    folder = copy_checkpoint(peft_ckpt, tmp_path / "ckpt")
    _plant_pickle(folder, tmp_path / "pwned")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert not (tmp_path / "pwned").exists()


# --- the checkpoint folder itself ---------------------------------------------------------------------------------


def test_empty_folder_is_named(tmp_path):
    assert_refused_unchanged(loaded_target(), tmp_path, rf"{re.escape(str(tmp_path))} holds no adapter")


def test_a_file_instead_of_a_folder_is_named(swift_ckpt):
    assert_refused_unchanged(loaded_target(), swift_ckpt / "configuration.json", "is a file")


def test_adapter_folder_without_weights_is_named(swift_ckpt, tmp_path):
    folder = copy_checkpoint(swift_ckpt, tmp_path / "ckpt")
    (folder / "a" / SAFE).unlink()
    before = snapshot(target := loaded_target())
    with pytest.raises(FileNotFoundError, match=rf"no {SAFE} or adapter_model\.bin in {re.escape(str(folder / 'a'))}"):
        Swift.from_pretrained(target, folder)
    assert snapshot(target) == before
