import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from technique_helpers import random_batch, tiny_llama
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from peft_swift_ext.techniques.lisa import LisaCallback, LisaConfig, LisaScheduler, find_decoder_layers


def _layer_weights(model):
    return [torch.cat([p.detach().flatten() for p in layer.parameters()]).clone() for layer in model.model.layers]


def _trainable_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if all(p.requires_grad for p in layer.parameters())]


def test_swift_aliases_give_the_same_config():
    assert LisaConfig(lisa_activated_layers=2, lisa_step_interval=5) == LisaConfig(n_layers=2, interval=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs n_layers"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
        ({"n_layers": 2, "interval": 0}, "interval must be"),
        ({"n_layers": 2, "lisa_activated_layers": 3}, "disagree"),
        ({"n_layers": 2, "interval": 4, "lisa_step_interval": 5}, "disagree"),
    ],
)
def test_invalid_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LisaConfig(**kwargs)


def test_more_layers_than_the_model_has_is_refused_before_freezing(llama):
    with pytest.raises(ValueError, match="only 4 decoder layers"):
        LisaScheduler(llama, LisaConfig(n_layers=5))
    assert all(p.requires_grad for p in llama.parameters())


def test_decoder_layers_are_found_or_taken_from_the_path(llama):
    assert find_decoder_layers(llama) == ("model.layers", llama.model.layers)
    assert find_decoder_layers(llama, "model.layers")[1] is llama.model.layers
    with pytest.raises(ValueError, match="'model.blocks' is not a module"):
        find_decoder_layers(llama, "model.blocks")
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        find_decoder_layers(llama, "model.norm")


def test_step_activates_n_layers_every_interval_and_sets_embeddings_and_head(llama):
    scheduler = LisaScheduler(llama, LisaConfig(n_layers=2, interval=3, train_embeddings=False, train_head=True))
    draws = []
    for _ in range(9):
        scheduler.step()
        assert _trainable_layers(llama) == scheduler.active_layers
        assert len(scheduler.active_layers) == 2
        draws.append(tuple(scheduler.active_layers))
    assert draws[0] == draws[1] == draws[2] and draws[3] == draws[4] == draws[5]
    assert not llama.model.embed_tokens.weight.requires_grad
    assert llama.lm_head.weight.requires_grad
    assert llama.model.norm.weight.requires_grad  # outside the layers: left as it was


def test_draws_follow_the_seed_not_the_global_rng():
    def draws(seed):
        scheduler = LisaScheduler(tiny_llama(num_hidden_layers=8), LisaConfig(n_layers=2, interval=1, seed=seed))
        result = []
        for _ in range(10):
            torch.manual_seed(len(result))  # disturbing the global RNG must not matter
            scheduler.step()
            result.append(tuple(scheduler.active_layers))
        return result

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_tied_head_trains_when_embeddings_do():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    LisaScheduler(model, LisaConfig(n_layers=1, train_embeddings=True, train_head=False)).step()
    assert model.lm_head.weight.requires_grad


def _train(model, optimizer, scheduler, steps):
    """Plain loop; returns, per step, which layers changed."""
    changed = []
    for step in range(steps):
        scheduler.step()
        before = _layer_weights(model)
        model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        changed.append([i for i, (a, b) in enumerate(zip(before, _layer_weights(model))) if not torch.equal(a, b)])
    return changed


def test_layers_drawn_after_the_optimizer_was_built_are_updated(llama):
    optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-2)
    scheduler = LisaScheduler(llama, LisaConfig(n_layers=1, interval=1, seed=0), optimizer)
    history = []
    for step in range(12):
        changed = _train(llama, optimizer, scheduler, 1)[0]
        history.append(scheduler.active_layers)
        assert changed == scheduler.active_layers, f"step {step}"
    assert len({layer for active in history for layer in active}) == 4  # every layer got its turn


def test_optimizer_missing_frozen_layers_is_refused(llama):
    for layer in llama.model.layers[1:]:
        layer.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad])
    for layer in llama.model.layers[1:]:
        layer.requires_grad_(True)
    with pytest.raises(ValueError, match=r"decoder layers \[1, 2, 3\]"):
        LisaScheduler(llama, LisaConfig(n_layers=1), optimizer)


def test_optimizer_state_and_gradients_follow_the_active_layers(llama):
    optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-3)
    scheduler = LisaScheduler(llama, LisaConfig(n_layers=1, interval=1, train_embeddings=False), optimizer)
    drawn = set()
    for step in range(6):
        _train(llama, optimizer, scheduler, 1)
        drawn.add(scheduler.active_layers[0])
        active = llama.model.layers[scheduler.active_layers[0]]
        expected = {id(p) for p in active.parameters()} | {id(llama.model.norm.weight), id(llama.lm_head.weight)}
        assert {id(p) for p in optimizer.state} == expected, f"step {step}"
        assert all(p.grad is None for p in llama.parameters() if not p.requires_grad)
    assert len(drawn) > 1  # the draws did change, so state was released at least once


def test_lisa_equals_adamw_restarted_on_each_drawn_layer():
    """Reference: a fresh AdamW over only the drawn layer's weights for each run of steps it stays drawn."""
    config = LisaConfig(n_layers=1, interval=2, train_embeddings=False, train_head=False, seed=5)
    lisa_model = tiny_llama()
    lisa_model.model.norm.requires_grad_(False)
    reference = copy.deepcopy(lisa_model)
    optimizer = torch.optim.AdamW([p for p in lisa_model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = LisaScheduler(lisa_model, config, optimizer)

    reference_optimizer, previous = None, None
    for step in range(10):
        scheduler.step()
        lisa_model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        layer = scheduler.active_layers[0]
        if layer != previous:
            reference.requires_grad_(False)
            reference.model.layers[layer].requires_grad_(True)
            reference_optimizer = torch.optim.AdamW(reference.model.layers[layer].parameters(), lr=1e-2)
            previous = layer
        reference(**random_batch(seed=step)).loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    for a, b in zip(lisa_model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("wrapper", ["peft", "swift"])
def test_lisa_with_adapters_samples_which_layers_adapters_train(wrapper):
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    if wrapper == "peft":
        model = get_peft_model(tiny_llama(), config)
    else:
        from peft_swift_ext.swift import Swift

        model = Swift.prepare_model(tiny_llama(), {"default": config})
    scheduler = LisaScheduler(model, LisaConfig(n_layers=1, interval=1))
    scheduler.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {f"layers.{scheduler.active_layers[0]}." in n for n in trainable} == {True}


class _RandomTokens(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {k: v[0] for k, v in random_batch(batch_size=1, seed=index).items()}


def test_trainer_callback_updates_layers_drawn_later(tmp_path):
    model = tiny_llama()
    before = _layer_weights(model)
    callback = LisaCallback(LisaConfig(n_layers=1, interval=2, seed=1))
    drawn = []
    original_switch = LisaScheduler.switch_active_layers

    def record(self):
        original_switch(self)
        drawn.append(self.active_layers[0])

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_RandomTokens(), callbacks=[callback])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LisaScheduler, "switch_active_layers", record)
        trainer.train()
    changed = {i for i, (a, b) in enumerate(zip(before, _layer_weights(model))) if not torch.equal(a, b)}
    assert len(drawn) == 3
    assert changed == set(drawn)


def test_sft_trainer_callback_updates_only_drawn_layers(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset as HFDataset
    from technique_helpers import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama()
    before = _layer_weights(model)
    rows = [{"input_ids": random_batch(batch_size=1, seed=i)["input_ids"][0].tolist()} for i in range(4)]
    callback = LisaCallback(LisaConfig(n_layers=1, interval=2, seed=3))
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=HFDataset.from_list(rows), processing_class=tiny_tokenizer(),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    changed = [i for i, (a, b) in enumerate(zip(before, _layer_weights(model))) if not torch.equal(a, b)]
    assert changed == callback.scheduler.active_layers


def _saved_activation_bytes(model, batch):
    """Bytes of the tensors autograd keeps for the backward pass, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    return sum(kept.values()), loss


def _lisa_training(checkpoint_frozen_layers: bool, steps: int = 4):
    model = tiny_llama(num_hidden_layers=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = LisaConfig(n_layers=2, interval=2, seed=7, checkpoint_frozen_layers=checkpoint_frozen_layers)
    scheduler = LisaScheduler(model, config, optimizer)
    for step in range(steps):
        scheduler.step()
        model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, scheduler


def test_checkpointing_frozen_layers_trains_the_same_and_keeps_fewer_activations():
    plain, plain_scheduler = _lisa_training(False)
    checkpointed, scheduler = _lisa_training(True)
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    frozen = [i for i in range(6) if i not in scheduler.active_layers]
    assert all(
        type(checkpointed.model.layers[i].__dict__.get("forward")).__name__ == "_CheckpointedForward" for i in frozen
    )
    assert all("forward" not in checkpointed.model.layers[i].__dict__ for i in scheduler.active_layers)
    kept_plain, _ = _saved_activation_bytes(plain, random_batch(seed=50))
    kept_checkpointed, _ = _saved_activation_bytes(checkpointed, random_batch(seed=50))
    assert kept_checkpointed < 0.6 * kept_plain
    scheduler.stop()
    assert not any("forward" in layer.__dict__ for layer in checkpointed.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(
            checkpointed(**random_batch()).logits, plain(**random_batch()).logits, atol=1e-5, rtol=0
        )


def test_a_model_without_trainable_layers_is_refused(llama):
    for param in llama.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no decoder layer has a trainable parameter"):
        LisaScheduler(llama, LisaConfig(n_layers=1))
