import sys

import pytest
import torch
from technique_helpers import random_batch, tiny_llama
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from peft_swift_ext.techniques.galore import create_galore_optimizer, select_galore_parameters

pytest.importorskip("galore_torch")

Q0 = "model.layers.0.self_attn.q_proj"


def test_default_selection_is_every_linear_but_the_head(llama):
    selected = {id(p) for p in select_galore_parameters(llama)}
    linears = {id(m.weight) for m in llama.modules() if isinstance(m, torch.nn.Linear)}
    assert selected == linears - {id(llama.lm_head.weight)}


def test_selection_by_suffix_list_regex_and_embeddings(llama):
    q_weights = [layer.self_attn.q_proj.weight for layer in llama.model.layers]
    assert select_galore_parameters(llama, ["q_proj"]) == q_weights
    assert select_galore_parameters(llama, r".*\.0\.self_attn\.q_proj") == q_weights[:1]
    with_embeddings = select_galore_parameters(llama, ["q_proj"], include_embeddings=True)
    assert with_embeddings == q_weights + [llama.model.embed_tokens.weight, llama.lm_head.weight]
    with pytest.raises(ValueError, match="selects no trainable"):
        select_galore_parameters(llama, ["nothing"])


def _manual_galore_adamw_first_step(weight, grad, rank, lr, eps=1e-6, betas=(0.9, 0.999)):
    """One GaLore-AdamW step written out: SVD projection, Adam on the projected gradient, projection back."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    if grad.shape[0] >= grad.shape[1]:
        projection = vh[:rank]
        low_rank = grad @ projection.t()
    else:
        projection = u[:, :rank]
        low_rank = projection.t() @ grad
    m, v = (1 - betas[0]) * low_rank, (1 - betas[1]) * low_rank**2
    step = lr * (1 - betas[1]) ** 0.5 / (1 - betas[0]) * m / (v.sqrt() + eps)
    back = step @ projection if grad.shape[0] >= grad.shape[1] else projection @ step
    return weight - back


@pytest.mark.parametrize("per_layer", [False, True])
def test_first_step_equals_manual_galore(llama, per_layer):
    weight = llama.get_submodule(Q0).weight
    before = weight.detach().clone()
    optimizer, _ = create_galore_optimizer(llama, target_modules=[Q0], rank=4, lr=1e-2, per_layer=per_layer)
    llama(**random_batch()).loss.backward()
    grad = weight.grad.clone() if not per_layer else None
    optimizer.step()
    if per_layer:  # the hook stepped and freed the gradient during backward; recompute it for the reference
        assert weight.grad is None
        reference_model = tiny_llama()
        reference_model(**random_batch()).loss.backward()
        grad = reference_model.get_submodule(Q0).weight.grad
    torch.testing.assert_close(weight.detach(), _manual_galore_adamw_first_step(before, grad, 4, 1e-2))


def test_projected_update_has_at_most_rank_directions(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    optimizer, _ = create_galore_optimizer(llama, target_modules=["q_proj"], rank=3, lr=1e-2)
    for step in range(3):
        llama(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    q_delta = llama.get_submodule(Q0).weight.detach() - before[Q0 + ".weight"]
    k_delta = llama.get_submodule("model.layers.0.self_attn.k_proj").weight.detach()
    k_delta = k_delta - before["model.layers.0.self_attn.k_proj.weight"]
    assert torch.linalg.matrix_rank(q_delta) <= 3  # one projection (gap 50) spans all three steps
    assert torch.linalg.matrix_rank(k_delta) > 3  # not projected: plain AdamW


@pytest.mark.parametrize("optim", ["adafactor", "adamw"])
def test_trainer_accepts_the_optimizer(tmp_path, optim):
    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {k: v[0] for k, v in random_batch(batch_size=1, seed=index).items()}

    model = tiny_llama()
    before = model.get_submodule(Q0).weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    optimizers = create_galore_optimizer(model, target_modules=["q_proj"], rank=2, lr=1e-2, optim=optim)
    Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=optimizers).train()
    delta = model.get_submodule(Q0).weight.detach() - before
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 2


def test_eight_bit_on_cpu_names_the_cuda_requirement(llama):
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        create_galore_optimizer(llama, optim="adamw8bit")


def test_missing_galore_torch_names_the_extra(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "galore_torch", None)
    with pytest.raises(ImportError, match=r"peft-swift-ext\[galore\]"):
        create_galore_optimizer(llama)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"optim": "sgd"}, "optim must be"), ({"proj_type": "diag"}, "proj_type must be"), ({"rank": 0}, "positive")],
)
def test_invalid_options_are_refused(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_galore_optimizer(llama, **kwargs)
