"""LISA as a registered PEFT method: get_peft_model(model, LisaConfig(...)) and what PEFT's API does with it."""

import pytest
import safetensors.torch
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from technique_helpers import random_batch, tiny_llama
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import peft_swift_ext
from peft_swift_ext import LisaConfig, LisaModel
from peft_swift_ext.techniques import LisaCallback, LisaScheduler


def _layer_vectors(model):
    return [torch.cat([p.detach().flatten() for p in layer.parameters()]).clone() for layer in model.model.layers]


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _expected_draws(seed, num_layers, n_layers, draws):
    """The layer draws a seeded LISA run must make, computed independently of the scheduler."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(num_layers, generator=generator)[:n_layers].tolist()) for _ in range(draws)]


def _train(model, config, steps, lr=1e-2):
    """A plain loop with a real AdamW built right after get_peft_model; returns the draws made."""
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=lr)
    scheduler = LisaScheduler(peft_model, optimizer=optimizer)
    draws = []
    for step in range(steps):
        scheduler.step()
        if step % config.interval == 0:
            draws.append(scheduler.active_layers)
        peft_model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peft_model, draws


def test_lisa_is_registered_in_peft():
    assert PeftType.LISA.value == "LISA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LISA] is LisaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LISA] is LisaModel
    assert peft_swift_ext.TUNERS["lisa"].config_cls is LisaConfig
    assert LisaConfig(n_layers=2).peft_type == PeftType.LISA


def test_get_peft_model_adds_no_weights_and_leaves_every_candidate_trainable(llama):
    before = {name: p for name, p in llama.named_parameters()}
    peft_model = get_peft_model(llama, LisaConfig(n_layers=2, train_embeddings=False))
    after = dict(peft_model.get_base_model().named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert sum(p.numel() for p in peft_model.parameters()) == sum(p.numel() for p in before.values())
    assert isinstance(peft_model.base_model, LisaModel)
    trainable = {name for name, p in after.items() if p.requires_grad}
    layer_names = {name for name in before if name.startswith("model.layers.")}
    # every layer (so an optimizer built now holds them all) and the head; not the embeddings, nor the final norm
    assert trainable == layer_names | {"lm_head.weight"}


def test_training_with_adamw_updates_exactly_the_drawn_layers(llama):
    config = LisaConfig(n_layers=1, interval=2, seed=5)
    base = _layer_vectors(tiny_llama())
    peft_model, draws = _train(llama, config, steps=2)
    changed = [
        i for i, (old, new) in enumerate(zip(base, _layer_vectors(llama), strict=True)) if not torch.equal(old, new)
    ]
    assert draws == _expected_draws(5, 4, 1, 1)
    assert changed == draws[0]
    assert peft_model.peft_config["default"].trained_layers == draws[0]


def test_layers_drawn_later_are_updated_and_only_drawn_layers_ever_change(llama):
    config = LisaConfig(n_layers=1, interval=1, seed=2)
    base = _layer_vectors(tiny_llama())
    peft_model, draws = _train(llama, config, steps=6)
    drawn = sorted({i for draw in draws for i in draw})
    changed = [
        i for i, (old, new) in enumerate(zip(base, _layer_vectors(llama), strict=True)) if not torch.equal(old, new)
    ]
    assert draws == _expected_draws(2, 4, 1, 6)
    assert len(drawn) > 1, "the seed should draw more than one layer in six draws"
    assert changed == drawn
    assert peft_model.peft_config["default"].trained_layers == drawn


def test_same_seed_same_training_and_another_seed_other_draws():
    first, draws_a = _train(tiny_llama(), LisaConfig(n_layers=2, interval=1, seed=11), steps=4)
    second, draws_b = _train(tiny_llama(), LisaConfig(n_layers=2, interval=1, seed=11), steps=4)
    _, draws_c = _train(tiny_llama(), LisaConfig(n_layers=2, interval=1, seed=12), steps=4)
    assert draws_a == draws_b == _expected_draws(11, 4, 2, 4)
    assert draws_c == _expected_draws(12, 4, 2, 4) != draws_a
    for a, b in zip(_layer_vectors(first.get_base_model()), _layer_vectors(second.get_base_model()), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_on_a_fresh_base_gives_the_trained_outputs(tmp_path, tied):
    config = LisaConfig(n_layers=1, interval=1, seed=4, train_embeddings=True, train_head=not tied)
    peft_model, draws = _train(tiny_llama(tie_word_embeddings=tied), config, steps=3)
    trained = sorted({i for draw in draws for i in draw})
    batch = random_batch(seed=99)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)

    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    saved_layers = sorted({int(key.split("layers-")[1].split("-")[0]) for key in saved if "layers-" in key})
    assert saved_layers == trained, "the checkpoint holds exactly the layers that trained"
    assert any("embed_tokens" in key for key in saved)
    assert any("lm_head" in key for key in saved) != tied, "a tied head is saved once, as the embeddings"
    assert PeftConfig.from_pretrained(tmp_path).trained_layers == trained

    fresh = tiny_llama(tie_word_embeddings=tied)
    untouched = _layer_vectors(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert not torch.equal(untouched[trained[0]], _layer_vectors(fresh)[trained[0]])


def test_low_cpu_mem_usage_load_writes_into_the_model(tmp_path):
    peft_model, _ = _train(tiny_llama(), LisaConfig(n_layers=2, interval=1, seed=1), steps=2)
    trained = _state(peft_model.get_base_model())
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    for name, tensor in loaded.get_base_model().state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_merge_and_unload_returns_the_trained_base_model(llama):
    peft_model, _ = _train(llama, LisaConfig(n_layers=2, interval=1), steps=2)
    trained = _state(llama)
    merged = peft_model.merge_and_unload()
    assert merged is llama
    assert not any("lisa" in name for name, _ in merged.named_modules())
    assert all(torch.equal(tensor, trained[name]) for name, tensor in merged.state_dict().items())


def test_disable_and_unload_refuse_once_trained_instead_of_returning_trained_outputs(llama):
    peft_model = get_peft_model(llama, LisaConfig(n_layers=1))
    with peft_model.disable_adapter():  # nothing trained yet: the outputs are still the base model's
        pass
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2)
    LisaScheduler(peft_model, optimizer=optimizer).step()
    peft_model(**random_batch()).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="cannot disable the adapter.*in place"):
        with peft_model.disable_adapter():
            pass
    with pytest.raises(ValueError, match="cannot unload"):
        peft_model.unload()


def test_trainer_callback_reads_the_config_of_the_peft_model(tmp_path):
    class Batches(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {key: value[0] for key, value in random_batch(batch_size=1, seed=index).items()}

    model = tiny_llama()
    base = _layer_vectors(tiny_llama())
    peft_model = get_peft_model(model, LisaConfig(n_layers=1, interval=100, seed=3))
    callback = LisaCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(model=peft_model, args=args, train_dataset=Batches(), callbacks=[callback]).train()
    changed = [
        i for i, (old, new) in enumerate(zip(base, _layer_vectors(model), strict=True)) if not torch.equal(old, new)
    ]
    assert callback.scheduler.config is peft_model.peft_config["default"]
    assert changed == callback.scheduler.active_layers == _expected_draws(3, 4, 1, 1)[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_layers": "2"}, "n_layers must be a positive int"),
        ({"n_layers": True}, "n_layers must be a positive int"),
        ({"n_layers": 2, "interval": 0}, "interval must be a positive int"),
        ({"n_layers": 2, "seed": 1.5}, "seed must be an integer"),
        ({"n_layers": 2, "train_head": "yes"}, "train_head must be True or False"),
        ({"n_layers": 2, "layers_path": ""}, "layers_path must be"),
        ({"n_layers": 2, "trained_layers": [-1]}, "trained_layers must be"),
    ],
)
def test_bad_config_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LisaConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_layers": 5}, "only 4 layers"),
        ({"n_layers": 1, "layers_path": "model.blocks"}, "layers_path.*is not a module"),
        ({"n_layers": 1, "layers_path": "model.norm"}, "layers_path.*not a non-empty nn.ModuleList"),
        ({"n_layers": 1, "trained_layers": [4]}, "trained_layers names layers \\[4\\]"),
    ],
)
def test_config_that_does_not_fit_the_model_is_refused_before_the_model_changes(llama, kwargs, message):
    state = _state(llama)
    grads = {name: p.requires_grad for name, p in llama.named_parameters()}
    modules = [name for name, _ in llama.named_modules()]
    with pytest.raises(ValueError, match=message):
        get_peft_model(llama, LisaConfig(**kwargs))
    assert {name: p.requires_grad for name, p in llama.named_parameters()} == grads
    assert [name for name, _ in llama.named_modules()] == modules
    assert all(torch.equal(t, state[n]) for n, t in llama.state_dict().items())


def test_a_second_lisa_adapter_is_refused(llama):
    peft_model = get_peft_model(llama, LisaConfig(n_layers=1))
    with pytest.raises(ValueError, match="one LISA adapter"):
        peft_model.add_adapter("other", LisaConfig(n_layers=2))
    assert list(peft_model.peft_config) == ["default"]


def test_scheduler_refuses_a_second_config_for_a_lisa_model(llama):
    peft_model = get_peft_model(llama, LisaConfig(n_layers=1))
    with pytest.raises(ValueError, match="its own LisaConfig"):
        LisaScheduler(peft_model, LisaConfig(n_layers=2))
    with pytest.raises(ValueError, match="needs a LisaConfig"):
        LisaScheduler(tiny_llama())


def test_layerwise_optimizer_trains_exactly_like_adamw_and_keeps_no_gradients():
    from peft_swift_ext.techniques import create_layerwise_optimizer

    reference, draws = _train(tiny_llama(), LisaConfig(n_layers=1, interval=2, seed=6), steps=4)
    peft_model = get_peft_model(tiny_llama(), LisaConfig(n_layers=1, interval=2, seed=6))
    optimizer, _ = create_layerwise_optimizer(peft_model, lr=1e-2, weight_decay=0.01)  # AdamW's default
    scheduler = LisaScheduler(peft_model, optimizer=optimizer)
    for step in range(4):
        scheduler.step()
        peft_model(**random_batch(seed=step)).loss.backward()
        assert all(p.grad is None for p in peft_model.parameters()), "each gradient is freed once applied"
        optimizer.step()  # a stand-in: the hooks did the work
    for a, b in zip(reference.parameters(), peft_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    active = {id(p) for i in scheduler.active_layers for p in peft_model.get_base_model().model.layers[i].parameters()}
    layer_params = [p for layer in peft_model.get_base_model().model.layers for p in layer.parameters()]
    with_state = {id(p) for p in layer_params if optimizer.optimizers[p].state}
    assert with_state == active, "refrozen layers keep no optimizer state"


def test_training_continues_after_loading_with_is_trainable(tmp_path):
    first, draws = _train(tiny_llama(), LisaConfig(n_layers=1, interval=1, seed=8), steps=1)
    first.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    config = loaded.peft_config["default"]
    assert config.trained_layers == draws[0]
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    scheduler = LisaScheduler(loaded, optimizer=optimizer)
    scheduler.step()
    loaded(**random_batch()).loss.backward()
    optimizer.step()
    assert config.trained_layers == sorted({*draws[0], *scheduler.active_layers})
    loaded.save_pretrained(tmp_path / "again")
    saved = safetensors.torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted({int(k.split("layers-")[1].split("-")[0]) for k in saved if "layers-" in k}) == config.trained_layers


def test_per_row_and_scoped_selection_are_refused(llama):
    # LISA trains the base weights in place: neither a batch row nor a block of code can run without it
    model = get_peft_model(llama, LisaConfig(n_layers=1))
    ids = torch.arange(5)[None]
    with pytest.raises(ValueError, match="per-row selection is not available for LISA"):
        model.eval()(input_ids=ids, adapter_names=["__base__"])
    with pytest.raises(ValueError, match="a scope cannot select LISA's adapter"):
        with model.adapters():
            model(input_ids=ids)


def test_merging_the_marker_itself_names_the_way_that_works(llama):
    model = get_peft_model(llama, LisaConfig(n_layers=1))
    with pytest.raises(NotImplementedError, match="merge through the model"):
        model.base_model.lisa_marker.merge()
