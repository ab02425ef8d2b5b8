"""The Swift shim and SwiftModel: composition, activation, merging, formats, errors."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType

import peft_swift_ext
from peft_swift_ext import LoraPlusConfig, Swift, SwiftModel, create_lora_plus_optimizer

from ..helpers import randomize_adapter, run, state_hash
from ..tiny_models import llama_inputs, main_output, tiny_llama


def lora(targets=("q_proj", "v_proj"), r=4, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False, **kwargs)


def two_lora_model(per_thread: bool = False) -> SwiftModel:
    model = Swift.prepare_model(tiny_llama(), {"a": lora(), "b": lora(["o_proj", "down_proj"])}, per_thread=per_thread)
    return model.eval()


def logits(model, inputs=None) -> torch.Tensor:
    return run(model, inputs or llama_inputs(), main_output)


# --- registration -----------------------------------------------------------------------------------------------


def test_import_registers_each_method_once_even_after_reload():
    importlib.reload(peft_swift_ext.core.registry)
    importlib.reload(peft_swift_ext.tuners.lora_plus)
    importlib.reload(peft_swift_ext)
    members = [member for member in PeftType if member.value == "LORAPLUS"]
    assert len(members) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORAPLUS].__name__ == "LoraPlusModel"
    assert "loraplus" in peft_swift_ext.TUNERS
    assert {"adapter", "restuning", "neftune"} <= set(peft_swift_ext.core.registry.TUNERS), "reload forgot tuners"


def test_registration_is_visible_to_peft_in_a_fresh_process(tmp_path):
    code = (
        "import peft_swift_ext, peft; from peft.utils import PeftType;"
        "print(sorted(t.value for t in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING if t.value.isupper()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LORAPLUS" in out


# --- prepare_model ----------------------------------------------------------------------------------------------


def test_prepare_model_with_one_peft_config_returns_peft_model():
    model = Swift.prepare_model(tiny_llama(), lora())
    assert isinstance(model, PeftModel)


def test_prepare_model_with_dict_holds_several_types_and_can_be_repeated():
    model = Swift.prepare_model(tiny_llama(), {"a": lora()})
    model = Swift.prepare_model(model, {"plus": LoraPlusConfig(r=2, target_modules=["o_proj"])})
    model = Swift.prepare_model(
        model, AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["k_proj"]), adapter_name="ada"
    )
    assert isinstance(model, SwiftModel)
    assert model.adapters == ["a", "plus", "ada"]
    assert model.active_adapters == ["a", "plus", "ada"]


def test_prepare_model_target_that_matches_nothing_names_pattern_and_leaves_model_unchanged():
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module.*model\.embed_tokens"):
        Swift.prepare_model(model, {"a": lora(), "b": lora(["nope"])})
    assert state_hash(model) == before
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.parametrize("pattern", [r"(a|a)+$", r"model\.layers\.\d+\.nothing"])
def test_a_regex_that_matches_nothing_is_named_as_given(pattern):
    # regexes are replaced by literal equivalents before PEFT matches them; the error must quote the user's pattern,
    # not the literal "(?!)" that stands for "nothing"
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(ValueError, match="target_modules=" + re.escape(repr(pattern)) + " matches no module"):
        Swift.prepare_model(model, {"a": LoraConfig(r=2, target_modules=pattern)})
    assert state_hash(model) == before


def test_duplicate_adapter_name_is_refused():
    model = Swift.prepare_model(tiny_llama(), {"a": lora()})
    with pytest.raises(ValueError, match="already exist"):
        Swift.prepare_model(model, {"a": lora()})


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "", "extra_states"])
def test_adapter_names_that_escape_the_save_directory_are_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        Swift.prepare_model(tiny_llama(), {name: lora()})


@pytest.mark.parametrize("call", ["activate_adapter", "deactivate_adapter", "save_pretrained", "delete_adapter"])
def test_unknown_adapter_names_list_the_known_ones(call, tmp_path):
    model = two_lora_model()
    args = (tmp_path, True, "zzz") if call == "save_pretrained" else ("zzz",)
    with pytest.raises(ValueError, match=r"unknown adapter.*'zzz'.*\['a', 'b'\]"):
        getattr(model, call)(*args)


# --- activation -------------------------------------------------------------------------------------------------


def test_each_adapter_switches_on_its_own():
    model = two_lora_model()
    inputs = llama_inputs()
    both = logits(model, inputs)
    model.set_active_adapters(["a"])
    only_a = logits(model, inputs)
    model.set_active_adapters(["b"])
    only_b = logits(model, inputs)
    model.set_active_adapters([])
    base = logits(model, inputs)
    torch.testing.assert_close(base, logits(tiny_llama(), inputs), atol=0, rtol=0)
    # LoRA deltas on different modules of a 2-layer model are not additive, so check each is distinct
    assert len({round(float(t.sum()), 4) for t in (both, only_a, only_b, base)}) == 4


def test_disable_adapter_restores_the_previous_set_not_all():
    model = two_lora_model()
    model.set_active_adapters(["a"])
    only_a = logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=0, rtol=0)
    assert model.active_adapters == ["a"]
    torch.testing.assert_close(logits(model), only_a, atol=0, rtol=0)


def test_per_thread_activation_runs_concurrently_with_exact_outputs():
    model = two_lora_model(per_thread=True)
    inputs = llama_inputs()
    references = {}
    for names in (("a",), ("b",), ("a", "b"), ()):
        reference = two_lora_model()
        reference.set_active_adapters(list(names))
        references[names] = logits(reference, inputs)
    failures: list[str] = []
    barrier = threading.Barrier(4)

    def worker(names: tuple[str, ...]) -> None:
        model.set_active_adapters(list(names))
        barrier.wait()
        for _ in range(5):
            if not torch.equal(logits(model, inputs), references[names]):
                failures.append(f"{names} differs")

    threads = [threading.Thread(target=worker, args=(names,)) for names in references]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_a_new_thread_starts_with_no_adapter_active():
    model = two_lora_model(per_thread=True)
    model.set_active_adapters(["a", "b"])
    seen = []
    thread = threading.Thread(target=lambda: seen.append((model.active_adapters, logits(model))))
    thread.start()
    thread.join()
    assert seen[0][0] == []
    torch.testing.assert_close(seen[0][1], logits(tiny_llama()), atol=0, rtol=0)


def test_env_var_selects_per_thread_mode(monkeypatch):
    monkeypatch.setenv("USE_UNIQUE_THREAD", "0")
    assert Swift.prepare_model(tiny_llama(), {"a": lora()}).activation.per_thread
    monkeypatch.setenv("USE_UNIQUE_THREAD", "1")
    assert not Swift.prepare_model(tiny_llama(), {"a": lora()}).activation.per_thread


def test_per_thread_mode_refuses_merge_and_offload():
    model = two_lora_model(per_thread=True)
    with pytest.raises(ValueError, match="USE_UNIQUE_THREAD=0"):
        Swift.merge(model)
    with pytest.raises(ValueError, match="USE_UNIQUE_THREAD=0"):
        model.deactivate_adapter("a", offload="cpu")


def test_offload_to_meta_frees_the_weights_and_restores_them_bit_exact():
    model = two_lora_model()
    expected = logits(model)
    saved = {k: v.clone() for k, v in model.adapter_state_dict("a").items()}
    model.set_active_adapters(["b"], offload="meta")
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["a"].weight.device.type == "meta"
    model.set_active_adapters(["a", "b"])
    assert all(torch.equal(saved[k], v) for k, v in model.adapter_state_dict("a").items())
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_save_of_an_offloaded_adapter_writes_its_real_weights(tmp_path):
    model = two_lora_model()
    expected = logits(model)
    model.deactivate_adapter("a", offload="meta")
    model.save_pretrained(tmp_path)
    assert model.offload_store.is_offloaded("a")
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)


# --- merging ----------------------------------------------------------------------------------------------------


def test_hundred_merge_unmerge_cycles_restore_base_weights():
    model = two_lora_model()
    original = {k: v.clone() for k, v in model.model.state_dict().items() if "base_layer" in k}
    for _ in range(100):
        Swift.merge(model)
        Swift.unmerge(model)
    drift = max((model.model.state_dict()[k] - v).abs().max().item() for k, v in original.items())
    assert drift <= 1e-6


def test_switching_while_merged_is_refused():
    model = two_lora_model()
    Swift.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        model.deactivate_adapter("a")


def test_merge_and_unload_returns_plain_model_with_same_outputs():
    model = two_lora_model()
    expected = logits(model)
    plain = Swift.merge_and_unload(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_swift_merge_works_on_peft_models_too():
    model = Swift.prepare_model(tiny_llama(), lora()).eval()
    expected = logits(model)
    Swift.merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    Swift.unmerge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=0)


# --- optimizer groups, weighted adapters, summary ---------------------------------------------------------------


def test_lora_plus_groups_give_b_the_ratio_and_others_decay_groups():
    model = Swift.prepare_model(
        tiny_llama(),
        {"plus": LoraPlusConfig(r=2, target_modules=["q_proj"], lorap_lr_ratio=10.0), "plain": lora(["v_proj"])},
    )
    groups = model.create_optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    by_param = {id(p): group for group in groups for p in group["params"]}
    layer = model.model.model.layers[0].self_attn
    assert by_param[id(layer.q_proj.lora_B["plus"].weight)]["lr"] == pytest.approx(1e-2)
    assert by_param[id(layer.q_proj.lora_A["plus"].weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(layer.v_proj.lora_B["plain"].weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(layer.v_proj.lora_B["plain"].weight)]["weight_decay"] == 0.1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(by_param)


def test_a_parameter_in_two_groups_is_an_error():
    model = two_lora_model()
    shared = model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight
    model.model.model.layers[1].self_attn.o_proj.lora_A["b"].weight = shared
    with pytest.raises(ValueError, match="claimed by both"):
        model.create_optimizer_param_groups(lr=1e-3)


def test_lora_plus_optimizer_for_a_peft_model_uses_the_config_ratio():
    model = get_peft_model(tiny_llama(), LoraPlusConfig(r=2, target_modules=["q_proj"], loraplus_lr_ratio=4.0))
    optimizer = create_lora_plus_optimizer(model, lr=1e-3)
    lrs = sorted({group["lr"] for group in optimizer.param_groups if group["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(4e-3)]


def test_add_weighted_adapter_cat_equals_both_adapters_active():
    model = Swift.prepare_model(tiny_llama(), {"a": lora(r=2), "b": lora(r=3)}).eval()
    both = logits(model)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert model.active_adapters == ["ab"]
    torch.testing.assert_close(logits(model), both, atol=1e-5, rtol=0)


def test_trainable_parameter_summary_has_swift_format_and_true_counts():
    model = two_lora_model()
    summary = model.get_trainable_parameters()
    match = re.fullmatch(
        r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4}) \|\| "
        r"(cuda memory|cpu resident memory|cpu peak resident memory): \d+\.\d{2}GiB\.",
        summary,
    )
    assert match, summary
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert int(match.group(1).replace(",", "")) == trainable
    assert int(match.group(2).replace(",", "")) == sum(p.numel() for p in model.parameters())


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_from_pretrained_selects_renames_and_can_be_repeated(tmp_path):
    model = two_lora_model()
    model.save_pretrained(tmp_path)
    model.set_active_adapters(["a"])
    only_a = logits(model)
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path, adapter_name="a")
    assert loaded.adapters == ["a"]
    torch.testing.assert_close(logits(loaded), only_a, atol=1e-6, rtol=0)
    Swift.from_pretrained(loaded, tmp_path, adapter_name={"a": "a2", "b": "b2"})
    assert loaded.adapters == ["a", "a2", "b2"]
    loaded.set_active_adapters(["a2"])
    torch.testing.assert_close(logits(loaded), only_a, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"not found in the checkpoint; it holds: \['a', 'b'\]"):
        Swift.from_pretrained(loaded, tmp_path, adapter_name=["zzz"])


def test_from_pretrained_reads_peft_layout(tmp_path):
    peft_model = get_peft_model(tiny_llama(), lora())
    peft_model.add_adapter("second", lora(["o_proj"]))
    randomize_adapter(peft_model, "second", seed=1)
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model.eval())
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.adapters == ["default", "second"]
    loaded.set_active_adapters(["default"])
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)


def test_non_local_model_id_without_hub_access_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local directory"):
        Swift.from_pretrained(tiny_llama(), "some-user/some-adapter-that-does-not-exist")


def test_save_to_peft_format_loads_with_plain_peft_in_a_fresh_process(tmp_path):
    model = Swift.prepare_model(
        tiny_llama(), {"default": lora(), "plus": LoraPlusConfig(r=2, target_modules=["k_proj"])}
    )
    randomize_adapter(model, "plus", seed=2)
    model.save_pretrained(tmp_path / "swift")
    Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "peft")
    expected = {}
    for name in ("default", "plus"):
        model.set_active_adapters([name])
        expected[name] = logits(model)
    torch.save({**expected, "inputs": llama_inputs()["input_ids"]}, tmp_path / "expected.pt")
    config = json.loads((tmp_path / "peft" / "plus" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "loraplus_lr_ratio" not in config
    script = f"""
import sys, torch
from peft import PeftModel
sys.path.insert(0, {os.getcwd()!r})
from tests.tiny_models import tiny_llama
assert "peft_swift_ext" not in sys.modules
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
for name, folder in (("default", ""), ("plus", "plus")):
    model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "peft")!r} + "/" + folder).eval()
    with torch.no_grad():
        out = model(input_ids=expected["inputs"]).logits
    assert (out - expected[name]).abs().max() < 1e-6, name
assert "peft_swift_ext" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_save_to_peft_format_refuses_non_lora_and_writes_nothing(tmp_path):
    model = Swift.prepare_model(
        tiny_llama(),
        {"a": lora(), "ada": AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["k_proj"])},
    )
    model.save_pretrained(tmp_path / "swift")
    with pytest.raises(ValueError, match="only LoRA adapters convert"):
        Swift.save_to_peft_format(tmp_path / "swift", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swift"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = two_lora_model()
    model.save_pretrained(tmp_path / "ckpt")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    randomize_adapter(model, "b", seed=9)

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return original_save(*args, **kwargs)

    from peft_swift_ext.core import files as checkpoint

    original_save = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(tmp_path / "ckpt")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_pickle_checkpoints_are_read_without_running_code(tmp_path):
    model = two_lora_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=0)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (tmp_path / "a" / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    target = tiny_llama()
    before = state_hash(target)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        Swift.from_pretrained(target, tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert state_hash(target) == before


def test_checkpoint_with_wrong_shapes_lists_them_and_leaves_model_unchanged(tmp_path):
    Swift.prepare_model(tiny_llama(), {"a": lora(r=4)}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    target = tiny_llama()
    before = state_hash(target)
    with pytest.raises(
        ValueError, match=r"mismatched keys: .*lora_A\.a\.weight: checkpoint \(4, 32\) vs model \(8, 32\)"
    ):
        Swift.from_pretrained(target, tmp_path)
    assert state_hash(target) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "NOT_A_TUNER"}, "Unknown peft_type 'NOT_A_TUNER'"),
        ({"r": "eight"}, "field 'r' of LoraConfig has a str value"),
        ({"target_modules": 3}, "field 'target_modules'"),
    ],
)
def test_broken_config_json_is_named_with_its_field(tmp_path, change, message):
    Swift.prepare_model(tiny_llama(), {"a": lora()}).save_pretrained(tmp_path)
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        Swift.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_folder_symlinked_outside_the_checkpoint_is_refused(tmp_path):
    Swift.prepare_model(tiny_llama(), {"a": lora()}).save_pretrained(tmp_path / "elsewhere")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "evil").symlink_to(tmp_path / "elsewhere" / "a")
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        Swift.from_pretrained(tiny_llama(), tmp_path / "ckpt")


def test_unknown_swift_type_is_named(tmp_path):
    Swift.prepare_model(tiny_llama(), {"a": lora()}).save_pretrained(tmp_path)
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "swift_type": "MYSTERY"}))
    with pytest.raises(ValueError, match="unknown swift_type 'MYSTERY'"):
        Swift.from_pretrained(tiny_llama(), tmp_path)


def test_low_cpu_mem_usage_load_gives_same_outputs(tmp_path):
    model = two_lora_model()
    model.save_pretrained(tmp_path)
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("wrapper", ["peft", "swift"])
def test_lora_plus_optimizer_trains_with_the_hf_trainer(wrapper, tmp_path):
    from transformers import Trainer, TrainingArguments

    config = LoraPlusConfig(r=4, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16.0)
    model = (
        get_peft_model(tiny_llama(), config) if wrapper == "peft" else Swift.prepare_model(tiny_llama(), {"p": config})
    )
    optimizer = create_lora_plus_optimizer(model, lr=1e-2)
    ids = torch.arange(16).repeat(8, 1)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None))
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, b_before[n]) for n, p in model.named_parameters() if n in b_before)
