"""Finding adapters, choosing the backend, and the start-up check that the model batches mixed adapters."""

from __future__ import annotations

import json
import shutil

import pytest

from peft_swift_ext.serve.loading import (
    adapter_types,
    check_mixed_batches,
    choose_backend,
    find_adapters,
    load_base_model,
    load_engine,
)


def write_adapter(folder, peft_type="LORA"):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))


def test_adapters_are_the_sub_folders_and_a_root_adapter_is_default(tmp_path):
    write_adapter(tmp_path / "b")
    write_adapter(tmp_path / "a", "ADAPTER")
    (tmp_path / "not_an_adapter").mkdir()
    assert find_adapters(tmp_path) == {"a": tmp_path / "a", "b": tmp_path / "b"}
    assert adapter_types(find_adapters(tmp_path)) == {"a": "ADAPTER", "b": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert list(find_adapters(tmp_path)) == ["default", "a", "b"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "is not a folder"), ("empty", "holds no adapter"), ("base", "may not be named '__base__'")],
)
def test_bad_adapter_folders_are_named(tmp_path, layout, message):
    folder = tmp_path / "adapters"
    if layout != "missing":
        folder.mkdir()
    if layout == "base":
        write_adapter(folder / "__base__")
    with pytest.raises(ValueError, match=f"--adapters: .*{message}"):
        find_adapters(folder)


def test_a_config_without_a_type_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"x/adapter_config.json names no peft_type"):
        adapter_types(find_adapters(tmp_path))


def test_backend_choice():
    assert choose_backend({"a": "LORA", "b": "LORA"}) == "peft"
    assert choose_backend({"a": "LORA", "b": "ADAPTER"}) == "swift"
    assert choose_backend({"a": "LORA"}, "swift") == "swift"
    with pytest.raises(ValueError, match="mix"):
        choose_backend({"a": "LORA", "b": "ADAPTER"}, "peft")
    with pytest.raises(ValueError, match="--backend must be one of"):
        choose_backend({"a": "LORA"}, "vllm")


def test_the_base_model_must_be_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="--model: .* is not a local folder"):
        load_base_model(tmp_path / "HuggingFaceTB/SmolLM2-135M")


def test_a_model_without_per_row_adapters_fails_at_start_up(serving_files):
    from peft_swift_ext.serve.engine import Engine

    model, tokenizer = load_base_model(serving_files[0])
    with pytest.raises(RuntimeError, match=r"cannot run one batch with a different adapter per row"):
        check_mixed_batches(Engine(model, tokenizer, {"alpha": "LORA"}))


def test_the_swift_backend_serves_mixed_batches(serving_files):
    engine = load_engine(*serving_files, backend="swift")
    assert engine.backend == "swift"


def test_an_unreadable_weights_file_is_named_at_start_up(lora_serving_files, tmp_path):
    # PEFT's loader lets the safetensors reader's own exception type through; the server names the folder instead
    model_dir, adapters_dir = lora_serving_files
    broken = tmp_path / "adapters"
    shutil.copytree(adapters_dir, broken)
    (weights,) = (broken / "beta").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"--adapters: .*beta holds an unreadable safetensors file"):
        load_engine(model_dir, broken, backend="peft")
