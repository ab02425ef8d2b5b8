"""Atomic saves: a failure in the middle of ``save_pretrained`` or ``save_to_peft_format`` leaves the previous
checkpoint byte-for-byte intact and no partial or temporary folder next to it.

Failures are injected into each step that writes or moves files (the n-th call of ``safetensors``'
``save_file``, of ``Path.write_text``, of ``os.replace``), as a full disk or a crash would interrupt them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from peft_swift_ext import Swift
from peft_swift_ext.core import files as checkpoint

from ..helpers import randomize_adapter
from ..tiny_models import tiny_llama
from ._common import lora


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Injected(OSError):
    """The failure the tests inject (an OSError, like a full disk)."""


def fail_on_call(monkeypatch, owner, name: str, call: int, partial: bool = False) -> list:
    """Make the ``call``-th call of ``owner.name`` raise; with ``partial`` a write first leaves half its text."""
    original = getattr(owner, name)
    calls: list = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            if partial and name == "write_text":
                original(args[0], args[1][: len(args[1]) // 2], **kwargs)
            raise Injected(f"injected failure in {name} call {call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture
def saved(tmp_path):
    """A model with adapters ``a`` and ``b``, its checkpoint in ``tmp_path/ckpt``, and the adapters changed since."""
    model = Swift.prepare_model(tiny_llama(), {"a": lora(), "b": lora(["o_proj"])})
    model.save_pretrained(tmp_path / "ckpt")
    before = files_of(tmp_path / "ckpt")
    randomize_adapter(model, "a", seed=5)
    randomize_adapter(model, "b", seed=6)
    return model, before


def assert_previous_intact(tmp_path: Path, before: dict[str, bytes], folder: str = "ckpt") -> None:
    assert files_of(tmp_path / folder) == before
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != folder and p.name != "swift")
    assert leftovers == [], f"partial or temporary folders left: {leftovers}"


@pytest.mark.parametrize("call", [1, 2], ids=["first_adapter", "second_adapter"])
def test_save_pretrained_failing_in_a_weights_write_keeps_previous(call, saved, tmp_path, monkeypatch):
    model, before = saved
    fail_on_call(monkeypatch, checkpoint, "save_file", call)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


def test_save_pretrained_failing_in_a_config_write_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved
    fail_on_call(monkeypatch, Path, "write_text", 2, partial=True)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


def test_save_pretrained_interrupted_by_keyboard_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


def test_first_save_failing_leaves_no_folder(tmp_path, monkeypatch):
    model = Swift.prepare_model(tiny_llama(), {"a": lora(), "b": lora(["o_proj"])})
    fail_on_call(monkeypatch, checkpoint, "save_file", 2)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_save_pretrained_failing_while_moving_the_second_adapter_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved
    # replacing an existing folder is two renames (old out, new in): call 4 moves adapter b's new folder in
    fail_on_call(monkeypatch, os, "replace", 4)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


def test_save_pretrained_failing_in_the_root_marker_write_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved
    # writes: a's config, b's config, then configuration.json
    fail_on_call(monkeypatch, Path, "write_text", 3, partial=True)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


def test_save_pretrained_failing_while_moving_the_first_adapter_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved
    fail_on_call(monkeypatch, os, "replace", 2)
    with pytest.raises(Injected):
        model.save_pretrained(tmp_path / "ckpt")
    assert_previous_intact(tmp_path, before)


# --- save_to_peft_format --------------------------------------------------------------------------------------------


@pytest.fixture
def converted(tmp_path):
    """A SWIFT checkpoint in ``tmp_path/swift``, converted once to ``tmp_path/ckpt``, then changed."""
    model = Swift.prepare_model(tiny_llama(), {"default": lora(), "other": lora(["o_proj"])})
    model.save_pretrained(tmp_path / "swift")
    Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "ckpt")
    before = files_of(tmp_path / "ckpt")
    randomize_adapter(model, "default", seed=3)
    model.save_pretrained(tmp_path / "swift")
    return before


@pytest.mark.parametrize("call", [1, 2], ids=["first_adapter", "second_adapter"])
def test_save_to_peft_format_failing_in_a_weights_write_keeps_previous(call, converted, tmp_path, monkeypatch):
    fail_on_call(monkeypatch, checkpoint, "save_file", call)
    with pytest.raises(Injected):
        Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "ckpt")
    assert_previous_intact(tmp_path, converted)


@pytest.mark.parametrize("call", [1, 2], ids=["moving_old_out", "moving_new_in"])
def test_save_to_peft_format_failing_while_moving_into_place_keeps_previous(call, converted, tmp_path, monkeypatch):
    fail_on_call(monkeypatch, os, "replace", call)
    with pytest.raises(Injected):
        Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "ckpt")
    assert_previous_intact(tmp_path, converted)


def test_save_to_peft_format_success_replaces_its_own_entries_and_keeps_the_rest(converted, tmp_path):
    # the reference: a conversion into a fresh folder, compared file by file, plus a file the conversion never wrote
    (tmp_path / "ckpt" / "README.md").write_text("kept")
    Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "fresh")
    Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "ckpt")
    assert files_of(tmp_path / "ckpt") == {**files_of(tmp_path / "fresh"), "README.md": b"kept"}
    assert files_of(tmp_path / "fresh") != converted


def replace_calls_of_a_save(tmp_path: Path, save) -> int:
    """How many times ``save`` calls ``os.replace`` (counted on a copy, so each can then be made to fail)."""
    calls = []
    original = os.replace

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    os.replace = counting
    try:
        save()
    finally:
        os.replace = original
    return len(calls)


def test_save_pretrained_failing_in_any_rename_keeps_previous(saved, tmp_path, monkeypatch):
    model, before = saved
    shutil.copytree(tmp_path / "ckpt", tmp_path / "probe")
    total = replace_calls_of_a_save(tmp_path, lambda: model.save_pretrained(tmp_path / "probe"))
    shutil.rmtree(tmp_path / "probe")
    assert total >= 6  # the journal, and two renames per replaced entry
    for call in range(1, total + 1):
        with monkeypatch.context() as patch:
            fail_on_call(patch, os, "replace", call)
            with pytest.raises(Injected):
                model.save_pretrained(tmp_path / "ckpt")
        assert_previous_intact(tmp_path, before)
