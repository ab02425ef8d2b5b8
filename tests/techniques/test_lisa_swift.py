"""LISA as an adapter of a SwiftModel, alone or next to LoRA: training, saving, loading, switching, merging.

Design under test: inside a SwiftModel, LISA trains the *base* weights of the drawn decoder layers, including the
base weights under LoRA's wrappers (``q_proj.base_layer.weight``), while LoRA's own weights train all the time.
The references are computed another way: the same training done with LoRA alone (PEFT's ``get_peft_model``) plus
unfreezing the drawn layers by hand, and LISA alone through PEFT's ``get_peft_model``.
"""

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from technique_helpers import random_batch, tiny_llama
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from peft_swift_ext import LisaConfig, Swift
from peft_swift_ext.techniques import LisaCallback, LisaScheduler

NUM_LAYERS = 4
STEPS = 6
LR = 1e-2


def _lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _lisa_config(**overrides):
    return LisaConfig(**{"n_layers": 1, "interval": 2, "seed": 3, **overrides})


def _expected_draws(seed, num_layers, n_layers, draws):
    """The draws a seeded LISA run must make, computed independently of the scheduler."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(num_layers, generator=generator)[:n_layers].tolist()) for _ in range(draws)]


def _canonical(state):
    """Parameters by their plain-model name (no PEFT prefix, no ``base_layer``), LoRA's under their own names."""
    out = {}
    for name, tensor in state.items():
        name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        out[name.replace(".lora.", ".").replace(".default.", ".")] = tensor.detach().clone()
    return out


def _build_swift(order):
    """LoRA + LISA in one SwiftModel, composed in three ways; LoRA's initial weights seeded the same each time."""
    model = tiny_llama()
    torch.manual_seed(1)
    if order == "dict":
        return Swift.prepare_model(model, {"lora": _lora_config(), "lisa": _lisa_config()})
    if order == "lisa_first":
        swift = Swift.prepare_model(model, {"lisa": _lisa_config()})
        torch.manual_seed(1)
        return Swift.prepare_model(swift, {"lora": _lora_config()})
    swift = Swift.prepare_model(model, {"lora": _lora_config()})  # LISA added to an existing SwiftModel
    return Swift.prepare_model(swift, {"lisa": _lisa_config()})


def _train_swift(swift, steps=STEPS):
    optimizer = torch.optim.AdamW(swift.create_optimizer_param_groups(lr=LR, weight_decay=0.0))
    scheduler = LisaScheduler(swift, optimizer=optimizer)
    draws = []
    for step in range(steps):
        scheduler.step()
        if step % scheduler.config.interval == 0:
            draws.append(scheduler.active_layers)
        swift(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return scheduler, draws


def _train_reference(steps=STEPS, interval=2, seed=3):
    """LoRA alone through PEFT, and the drawn layers' base weights (plus embeddings and head) unfrozen by hand."""
    model = tiny_llama()
    torch.manual_seed(1)
    peft_model = get_peft_model(model, _lora_config())
    layers = model.model.layers
    base_of_layer = [[p for n, p in layer.named_parameters() if "lora_" not in n] for layer in layers]
    always = [model.model.embed_tokens.weight, model.lm_head.weight]
    for param in [p for layer in base_of_layer for p in layer] + always:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    draws = _expected_draws(seed, NUM_LAYERS, 1, (steps + interval - 1) // interval)
    for step in range(steps):
        if step % interval == 0:
            drawn = draws[step // interval]
            for index, params in enumerate(base_of_layer):
                for param in params:
                    param.requires_grad_(index in drawn)
                    if index not in drawn:
                        param.grad = None
                        optimizer.state.pop(param, None)
        peft_model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peft_model, draws


@pytest.fixture(scope="module")
def reference():
    peft_model, draws = _train_reference()
    return _canonical(peft_model.state_dict()), draws


@pytest.mark.parametrize("order", ["dict", "lisa_first", "added_later"])
def test_lora_plus_lisa_trains_like_lora_with_the_drawn_layers_unfrozen_by_hand(order, reference):
    expected, expected_draws = reference
    swift = _build_swift(order)
    before = _canonical(swift.model.state_dict())
    _, draws = _train_swift(swift)
    after = _canonical(swift.model.state_dict())
    assert draws == expected_draws
    assert after.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], msg=name)
    trained = sorted({i for d in draws for i in d})
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}."
        # LoRA trains in every layer, all the time
        assert not torch.equal(
            before[prefix + "self_attn.q_proj.lora_B.weight"], after[prefix + "self_attn.q_proj.lora_B.weight"]
        )
        # LISA trains the base weights of drawn layers, those under LoRA's wrapper included
        for base_weight in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight"):
            changed = not torch.equal(before[prefix + base_weight], after[prefix + base_weight])
            assert changed == (i in trained), (i, base_weight)
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # outside LISA's candidates
    assert swift.peft_config["lisa"].trained_layers == trained


def test_lisa_alone_in_a_swift_model_trains_like_the_peft_method():
    swift = Swift.prepare_model(tiny_llama(), {"lisa": _lisa_config()})
    _, draws = _train_swift(swift)
    peft_model = get_peft_model(tiny_llama(), _lisa_config())
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=LR, weight_decay=0.0)
    scheduler = LisaScheduler(peft_model, optimizer=optimizer)
    for step in range(STEPS):
        scheduler.step()
        peft_model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ours, theirs = swift.model.state_dict(), peft_model.get_base_model().state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    assert swift.peft_config["lisa"].trained_layers == peft_model.peft_config["default"].trained_layers


def test_save_then_load_on_a_fresh_base_gives_the_same_outputs(tmp_path):
    swift = _build_swift("dict")
    _, draws = _train_swift(swift)
    trained = sorted({i for d in draws for i in d})
    swift.eval()
    swift.save_pretrained(tmp_path)
    lisa_keys = set(safetensors.torch.load_file(tmp_path / "lisa" / "adapter_model.safetensors"))
    layer_keys = {f"model.layers.{i}.{n}" for i in trained for n, _ in tiny_llama().model.layers[i].named_parameters()}
    assert lisa_keys == layer_keys | {"model.embed_tokens.weight", "lm_head.weight"}
    lora_keys = set(safetensors.torch.load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert lora_keys and all(".lora_A.lora." in k or ".lora_B.lora." in k for k in lora_keys)

    loaded = Swift.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.peft_config["lisa"].trained_layers == trained
    batch = random_batch(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, swift(**batch).logits)
        torch.testing.assert_close(
            Swift.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)(**batch).logits,
            swift(**batch).logits,
        )
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference


def test_training_continues_after_loading_with_is_trainable(tmp_path):
    swift = _build_swift("dict")
    _train_swift(swift, steps=2)
    first = list(swift.peft_config["lisa"].trained_layers)
    swift.save_pretrained(tmp_path)
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    scheduler, draws = _train_swift(loaded)
    trained = sorted({*first, *(i for d in draws for i in d)})
    assert loaded.peft_config["lisa"].trained_layers == trained
    loaded.save_pretrained(tmp_path / "again")
    keys = set(safetensors.torch.load_file(tmp_path / "again" / "lisa" / "adapter_model.safetensors"))
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == set(trained)


def _numel(params):
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def test_trainable_parameters_and_optimizer_groups_follow_lora_and_the_drawn_layers():
    swift = _build_swift("dict")
    base = swift.model
    lora = [p for n, p in base.named_parameters() if "lora_" in n]
    layers = [[p for n, p in layer.named_parameters() if "lora_" not in n] for layer in base.model.layers]
    always = [base.model.embed_tokens.weight, base.lm_head.weight]

    def count():
        return int(swift.get_trainable_parameters().split("trainable params: ")[1].split(" ")[0].replace(",", ""))

    assert count() == _numel(lora + [p for layer in layers for p in layer] + always)  # before the first draw
    groups = swift.create_optimizer_param_groups(lr=LR)
    grouped = {id(p) for g in groups for p in g["params"]}
    scheduler = LisaScheduler(swift, optimizer=torch.optim.AdamW(groups))
    scheduler.step()
    (drawn,) = scheduler.active_layers
    assert count() == _numel(lora + layers[drawn] + always)
    assert {id(p) for n, p in base.named_parameters() if p.requires_grad} == {
        id(p) for p in lora + layers[drawn] + always
    }
    # the optimizer groups hold every layer LISA may draw later, frozen now or not, and LoRA; never the final norm
    regrouped = {id(p) for g in swift.create_optimizer_param_groups(lr=LR) for p in g["params"]}
    wanted = {id(p) for p in lora + [p for layer in layers for p in layer] + always}
    assert grouped == regrouped == wanted
    # adding or removing another adapter re-derives trainability without refreezing LISA's drawn layer
    Swift.prepare_model(swift, {"lora2": _lora_config()})
    swift.delete_adapter("lora2")
    assert count() == _numel(lora + layers[drawn] + always)


def _snapshot(swift):
    return (
        list(swift.adapters),
        list(swift.active_adapters),
        {n: (p.requires_grad, p.detach().clone()) for n, p in swift.model.named_parameters()},
    )


def _assert_same(snapshot, swift):
    adapters, active, params = snapshot
    assert swift.adapters == adapters and sorted(swift.active_adapters) == sorted(active)
    now = dict(swift.model.named_parameters())
    assert now.keys() == params.keys()
    for name, (requires_grad, value) in params.items():
        assert now[name].requires_grad == requires_grad and torch.equal(now[name], value), name


def test_switching_lisa_off_is_refused_once_trained_and_nothing_changes():
    swift = _build_swift("dict")
    _train_swift(swift, steps=1)
    snapshot = _snapshot(swift)
    refusals = [
        lambda: swift.deactivate_adapter("lisa"),
        lambda: swift.deactivate_adapter("lisa", offload="cpu"),
        lambda: swift.deactivate_adapter("lisa", offload="meta"),
        lambda: swift.set_active_adapters(["lora"]),
        lambda: swift.set_active_adapters(["lora"], offload="cpu"),
        lambda: swift.delete_adapter("lisa"),
        lambda: swift.unload(),
    ]
    for refuse in refusals:
        with pytest.raises(ValueError, match="LISA cannot .*in place"):
            refuse()
        _assert_same(snapshot, swift)
    with pytest.raises(ValueError, match="LISA cannot run the base model alone"):
        with swift.disable_adapter():
            pass
    _assert_same(snapshot, swift)
    swift.deactivate_adapter("lora", offload="cpu")  # other adapters still switch as before
    swift.activate_adapter("lora")
    _assert_same(snapshot, swift)


def test_lisa_can_be_switched_off_before_it_has_trained():
    swift = _build_swift("dict")
    lisa_params = [p for layer in swift.model.model.layers for n, p in layer.named_parameters() if "lora_" not in n]
    assert all(p.requires_grad for p in lisa_params)
    swift.deactivate_adapter("lisa")  # nothing has trained: allowed, and an inactive LISA trains nothing
    assert not any(p.requires_grad for p in lisa_params)
    assert all(p.requires_grad for n, p in swift.model.named_parameters() if "lora_" in n)
    swift.activate_adapter("lisa")
    assert all(p.requires_grad for p in lisa_params)
    swift.delete_adapter("lisa")  # and removed: its bookkeeping goes, LoRA stays trainable alone
    assert {n for n, p in swift.model.named_parameters() if p.requires_grad} == {
        n for n, _ in swift.model.named_parameters() if "lora_" in n
    }


def test_merge_and_unload_merges_lora_and_keeps_lisas_trained_weights():
    swift = _build_swift("dict")
    _, draws = _train_swift(swift)
    swift.eval()
    batch = random_batch(seed=99)
    with torch.no_grad():
        expected = swift(**batch).logits
    trained_q = swift.model.model.layers[draws[0][0]].self_attn.q_proj.base_layer.weight.detach().clone()
    merged = swift.merge_and_unload()
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected)
    original_q = tiny_llama().model.layers[draws[0][0]].self_attn.q_proj.weight
    assert not torch.equal(trained_q, original_q)  # LISA's training is in the merged weights


def test_errors_come_before_the_model_changes():
    swift = Swift.prepare_model(tiny_llama(), {"lora": _lora_config()})
    snapshot = _snapshot(swift)
    with pytest.raises(ValueError, match="n_layers=9"):
        Swift.prepare_model(swift, {"lisa": _lisa_config(n_layers=9)})
    _assert_same(snapshot, swift)
    Swift.prepare_model(swift, {"lisa": _lisa_config()})
    snapshot = _snapshot(swift)
    with pytest.raises(ValueError, match="one LISA adapter"):
        Swift.prepare_model(swift, {"lisa2": _lisa_config()})
    _assert_same(snapshot, swift)
    lora_only = torch.optim.AdamW([p for n, p in swift.named_parameters() if "lora_" in n])
    with pytest.raises(ValueError, match="does not hold the parameters of decoder layers"):
        LisaScheduler(swift, optimizer=lora_only)
    _assert_same(snapshot, swift)
    with pytest.raises(ValueError, match="its own LisaConfig"):
        LisaScheduler(swift, _lisa_config())
    # a fresh dict whose LISA does not fit leaves no adapter behind
    model = tiny_llama()
    names = {n for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="n_layers=9"):
        Swift.prepare_model(model, {"lora": _lora_config(), "lisa": _lisa_config(n_layers=9)})
    assert {n for n, _ in model.named_parameters()} == names


def test_trainer_callback_drives_the_lisa_adapter_of_a_swift_model(tmp_path):
    class Batches(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {key: value[0] for key, value in random_batch(batch_size=1, seed=index).items()}

    swift = _build_swift("dict")
    before = _canonical(swift.model.state_dict())
    callback = LisaCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(model=swift, args=args, train_dataset=Batches(), callbacks=[callback]).train()
    after = _canonical(swift.model.state_dict())
    assert callback.scheduler.config is swift.peft_config["lisa"]
    draws = _expected_draws(3, NUM_LAYERS, 1, 2)
    trained = sorted({i for d in draws for i in d})
    changed = sorted(
        {
            int(n.split(".")[2])
            for n in after
            if n.startswith("model.layers.") and "lora_" not in n and not torch.equal(before[n], after[n])
        }
    )
    assert changed == trained == swift.peft_config["lisa"].trained_layers


def test_a_lisa_checkpoint_saved_through_peft_loads_into_a_swift_model(tmp_path):
    peft_model = get_peft_model(tiny_llama(), _lisa_config())
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=LR)
    scheduler = LisaScheduler(peft_model, optimizer=optimizer)
    for step in range(3):
        scheduler.step()
        peft_model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.adapters == ["default"]
    batch = random_batch(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, peft_model(**batch).logits)


@pytest.mark.parametrize("broken", ["lora", "lisa"])
def test_a_failed_load_leaves_the_base_weights_as_they_were(tmp_path, broken):
    swift = _build_swift("lisa_first")  # saved order lisa, lora: LISA's weights would be written before LoRA fails
    _train_swift(swift, steps=2)
    swift.save_pretrained(tmp_path)
    weights_file = tmp_path / broken / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(weights_file)
    weights.pop(sorted(weights)[-1])
    safetensors.torch.save_file(weights, weights_file)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"does not fit adapter '{broken}'.*missing keys"):
        Swift.from_pretrained(model, tmp_path)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("partner", ["lora_with_its_own_head", "dora"])
def test_lisa_next_to_adapters_that_own_the_head_or_read_the_base_weight(tmp_path, partner):
    # LoRA's modules_to_save copy of lm_head is what runs, so LISA's head option leaves the original head untouched;
    # DoRA renormalises with the base weight LISA trains, so both must be saved for the reload to agree.
    if partner == "dora":
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    torch.manual_seed(1)
    swift = Swift.prepare_model(tiny_llama(), {"adapter": config, "lisa": _lisa_config()})
    before = {name: param.detach().clone() for name, param in swift.named_parameters()}
    _, draws = _train_swift(swift)
    changed = {name for name, param in swift.named_parameters() if not torch.equal(param, before[name])}
    drawn = {i for d in draws for i in d}
    assert {f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.weight" for i in drawn} <= changed
    if partner == "dora":
        assert any("lora_magnitude_vector" in name for name in changed)
    else:
        assert "base_model.model.lm_head.modules_to_save.adapter.weight" in changed
        assert "base_model.model.lm_head.original_module.weight" not in changed

    swift.eval()
    swift.save_pretrained(tmp_path)
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path).eval()
    batch = random_batch(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, swift(**batch).logits)
