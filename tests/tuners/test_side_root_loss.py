"""Side on the root model: the loss the model returns is the loss of the blended output, so training works.

The model computes its loss inside its own forward; the Side layer blends the model's output afterwards. Each
test computes the reference loss another way: cross-entropy of the returned (blended) logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.data import Dataset

from peft_swift_ext import SideConfig, Swift

from ..tiny_models import tiny_vit_classifier

NUM_LABELS = 5


def side_config(target_hidden_pos="logits") -> SideConfig:
    return SideConfig(
        dim=NUM_LABELS,
        target_modules="",
        side_module_name="fcn4",
        source_hidden_pos="pixel_values",
        target_hidden_pos=target_hidden_pos,
    )


def batch(size: int = 4, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(size, 3, 16, 16, generator=generator),
        "labels": torch.randint(0, NUM_LABELS, (size,), generator=generator),
    }


def side_parameters(model) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if "root_side" in name}


@pytest.mark.parametrize("wrap", ["peft", "swift"])
def test_loss_is_the_loss_of_the_blended_logits_and_reaches_the_side_network(wrap):
    base = tiny_vit_classifier()
    model = get_peft_model(base, side_config()) if wrap == "peft" else Swift.prepare_model(base, {"s": side_config()})
    model.train()
    inputs = batch()
    out = model(**inputs)
    unblended = type(base).forward(base, pixel_values=inputs["pixel_values"]).logits
    assert (out.logits - unblended).abs().max() > 1e-3, "the side network changes the logits"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, inputs["labels"]), rtol=0, atol=0)
    assert out.loss.requires_grad
    out.loss.backward()
    grads = {name: param.grad for name, param in side_parameters(model).items()}
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), grads.keys()
    assert all(param.grad is None for name, param in model.named_parameters() if "root_side" not in name)


def test_tuple_output_gets_the_loss_of_the_blended_logits():
    base = tiny_vit_classifier()
    model = get_peft_model(base, side_config(target_hidden_pos=1))  # (loss, logits) with labels
    inputs = batch()
    loss, logits = model(**inputs, return_dict=False)
    unblended = type(base).forward(base, pixel_values=inputs["pixel_values"]).logits
    assert (logits - unblended).abs().max() > 1e-3
    torch.testing.assert_close(loss, F.cross_entropy(logits, inputs["labels"]), rtol=0, atol=0)


class _Images(Dataset):
    def __init__(self, count: int = 16):
        self.data = batch(count, seed=7)

    def __len__(self):
        return len(self.data["labels"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.data.items()}


def mean_loss(model, data: _Images) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=data.data["pixel_values"]).logits
    return F.cross_entropy(logits, data.data["labels"]).item()


def test_trainer_trains_the_side_network_and_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_vit_classifier(), side_config())
    data = _Images()
    before = {name: param.detach().clone() for name, param in side_parameters(model).items()}
    backbone = {name: p.detach().clone() for name, p in model.named_parameters() if "root_side" not in name}
    loss_before = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=10, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = [name for name, param in side_parameters(model).items() if not torch.equal(param, before[name])]
    assert sorted(changed) == sorted(before), "every side-network weight and alpha trained"
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if "root_side" not in n)
    loss_after = mean_loss(model, data)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)


def test_a_term_the_model_adds_to_its_loss_is_kept():
    class WithAuxiliaryLoss(type(tiny_vit_classifier())):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss + 0.25 * out.logits.square().mean()
            return out

    base = tiny_vit_classifier()
    base.__class__ = WithAuxiliaryLoss
    model = get_peft_model(base, side_config())
    inputs = batch()
    out = model(**inputs)
    # the auxiliary term was computed from the unblended logits, inside the model: it stays as the model made it
    unblended = type(base).__mro__[1].forward(base, pixel_values=inputs["pixel_values"]).logits
    expected = F.cross_entropy(out.logits, inputs["labels"]) + 0.25 * unblended.square().mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_a_model_computing_its_loss_without_loss_function_is_refused_by_name():
    class InlineLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 16 * 16, NUM_LABELS)

        def forward(self, pixel_values, labels=None):
            logits = self.linear(pixel_values.flatten(1))
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    torch.manual_seed(0)
    model = get_peft_model(InlineLoss(), side_config())
    inputs = batch()
    assert model(pixel_values=inputs["pixel_values"])["loss"] is None  # without labels: nothing to follow
    with pytest.raises(ValueError, match="InlineLoss computed its loss from its unblended output"):
        model(**inputs)


def test_unload_and_deepcopy_keep_the_models_own_loss_function():
    base = tiny_vit_classifier()
    own = base.loss_function
    model = get_peft_model(base, side_config())
    inputs = batch()
    twin = copy.deepcopy(model)
    out = twin(**inputs)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, inputs["labels"]), rtol=0, atol=0)
    plain = model.unload()
    assert "_loss_function" not in vars(plain) and plain.loss_function is own

    custom = tiny_vit_classifier()
    custom.loss_function = lambda labels, logits, config, **kwargs: F.cross_entropy(logits, labels) * 2
    chosen = custom.loss_function
    model = get_peft_model(custom, side_config())
    out = model(**inputs)
    torch.testing.assert_close(out.loss, 2 * F.cross_entropy(out.logits, inputs["labels"]), rtol=0, atol=0)
    assert model.unload().loss_function is chosen
