"""LISA under the Trainer's resume_from_checkpoint: a resumed run is bit-identical to an uninterrupted one.

Two runs of `STEPS` optimizer steps with the same seeds: one straight through, one stopped after `STEPS // 2` steps
(its checkpoint saved), then a fresh model and Trainer resumed from that checkpoint for the rest. Both the layer
draws at every step and the final weights must be the same, for LISA as a PEFT method and as a plain-model
technique. Interval 3 puts the checkpoint inside a draw (the resumed run must go on with that draw), interval 4 on a
draw boundary.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from technique_helpers import random_batch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_swift_ext import LisaConfig
from peft_swift_ext.techniques import LisaCallback, LisaScheduler
from tests.tiny_models import tiny_llama

STEPS = 8


class _Tokens(Dataset):
    def __len__(self):
        return 2 * STEPS  # one epoch of STEPS batches of 2: the checkpoint falls inside the epoch

    def __getitem__(self, index):
        return {key: value[0] for key, value in random_batch(batch_size=1, seed=index).items()}


class _Recorder(TrainerCallback):
    """Records the drawn layers at each step and stops the run after `stop_at` steps (it is saved first)."""

    def __init__(self, lisa: LisaCallback, stop_at: int | None = None):
        self.lisa = lisa
        self.stop_at = stop_at
        self.draws: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.draws[state.global_step] = list(self.lisa.scheduler.active_layers)
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def _lisa_config(interval):
    return LisaConfig(n_layers=2, interval=interval, seed=0)


def _model(as_peft: bool, interval: int):
    """A fresh tiny Llama, wrapped by get_peft_model for LISA as a PEFT method; its LisaCallback."""
    model = tiny_llama(num_layers=4)
    if as_peft:
        return get_peft_model(model, _lisa_config(interval)), LisaCallback()
    return model, LisaCallback(_lisa_config(interval))


def _train(output_dir, as_peft, interval, stop_at=None, resume_from=None):
    model, lisa = _model(as_peft, interval)
    recorder = _Recorder(lisa, stop_at)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-2,
        save_strategy="steps", save_steps=STEPS // 2, save_only_model=False, use_cpu=True, report_to=[],
        logging_strategy="no", seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[lisa, recorder])
    trainer.train(resume_from_checkpoint=resume_from)
    base = model.get_base_model() if as_peft else model
    return {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}, recorder.draws


@pytest.mark.parametrize("interval", [3, 4])
@pytest.mark.parametrize("as_peft", [True, False], ids=["get_peft_model", "plain_model"])
def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path, as_peft, interval):
    straight, straight_draws = _train(tmp_path / "straight", as_peft, interval)
    half, first_draws = _train(tmp_path / "halves", as_peft, interval, stop_at=STEPS // 2)
    checkpoint = tmp_path / "halves" / f"checkpoint-{STEPS // 2}"
    resumed, second_draws = _train(tmp_path / "halves", as_peft, interval, resume_from=str(checkpoint))

    assert sorted(first_draws) == list(range(1, STEPS // 2 + 1))
    assert sorted(second_draws) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert {**first_draws, **second_draws} == straight_draws
    assert len({tuple(draw) for draw in straight_draws.values()}) > 1, "the seed should draw other layers later"
    assert not all(torch.equal(half[name], straight[name]) for name in straight), "the second half trains"
    assert resumed.keys() == straight.keys()
    differing = [name for name in straight if not torch.equal(resumed[name], straight[name])]
    assert not differing, f"resumed weights differ from the uninterrupted run's: {differing}"


def test_load_adapter_into_the_existing_adapter_takes_every_trained_layer(tmp_path):
    """What the Trainer does on resume: PeftModel.load_adapter(checkpoint, "default") into the live adapter, whose
    config (and so its list of trained layers) is not read again."""
    trained = get_peft_model(tiny_llama(num_layers=4), LisaConfig(n_layers=2, interval=1, seed=1))
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    scheduler = LisaScheduler(trained, optimizer=optimizer)
    for step in range(2):
        scheduler.step()
        trained(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trained_layers = trained.peft_config["default"].trained_layers
    assert trained_layers
    trained.save_pretrained(tmp_path)

    fresh = get_peft_model(tiny_llama(num_layers=4), LisaConfig(n_layers=2, interval=1, seed=1))
    result = fresh.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert not result.unexpected_keys and not result.missing_keys
    assert fresh.peft_config["default"].trained_layers == trained_layers
    for (name, expected), actual in zip(trained.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(actual, expected), name

    # the loaded layers are part of the next checkpoint, even if they do not train again
    fresh.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(num_layers=4), tmp_path / "again")
    for (name, expected), actual in zip(trained.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(actual, expected), name


def test_a_key_of_no_candidate_layer_stays_unexpected(tmp_path):
    peft_model = get_peft_model(tiny_llama(num_layers=4), LisaConfig(n_layers=1))
    result = peft_model.base_model.load_state_dict({"lisa_model-layers-9-mlp-up_proj-weight": torch.zeros(1)}, False)
    assert result.unexpected_keys == ["lisa_model-layers-9-mlp-up_proj-weight"]
    assert peft_model.peft_config["default"].trained_layers == []


@pytest.mark.parametrize("interval", [1, 3])
def test_fast_forward_continues_the_draws_of_an_uninterrupted_scheduler(interval):
    config = LisaConfig(n_layers=2, interval=interval, seed=7)
    straight = LisaScheduler(tiny_llama(num_layers=4), config)
    draws = []
    for _ in range(10):
        straight.step()
        draws.append(straight.active_layers)
    for resume_at in range(1, 10):
        model = tiny_llama(num_layers=4)
        resumed = LisaScheduler(model, config)
        resumed.fast_forward(resume_at)
        assert resumed.active_layers == draws[resume_at - 1]
        trainable = [i for i, layer in enumerate(model.model.layers) if next(layer.parameters()).requires_grad]
        assert trainable == draws[resume_at - 1], "the current draw is applied at once"
        later = []
        for _ in range(resume_at, 10):
            resumed.step()
            later.append(resumed.active_layers)
        assert later == draws[resume_at:]


def test_fast_forward_refuses_going_back():
    scheduler = LisaScheduler(tiny_llama(num_layers=4), LisaConfig(n_layers=1, interval=2))
    scheduler.fast_forward(3)
    for bad in (2, -1, 3.0, True):
        with pytest.raises(ValueError, match="fast_forward needs an int of at least 3"):
            scheduler.fast_forward(bad)
