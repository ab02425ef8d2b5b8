"""What the multi-process workers and the single-process references share: cases, data, loss, training steps.

The global batch has ``GLOBAL_BATCH`` rows; rank ``r`` of ``w`` trains on rows ``r::w`` in contiguous halves.
The loss is a mean, so the gradient DDP averages (and FSDP reduce-scatters) over ranks equals the gradient
of the whole batch in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from peft_swift_ext import AdapterConfig, NEFTuneConfig, Swift

from ..contract.case import ContractCase
from ..contract.cases import ALL_CASES
from ..helpers import randomize_adapter
from ..tiny_models import llama_inputs, main_output, tiny_llama

GLOBAL_BATCH = 4
STEPS = 3
LR = 0.5
NEFTUNE_SEED = 100


@dataclass
class DistCase:
    """One model to train: a contract case (PEFT) or a SwiftModel mixing tuners."""

    id: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[..., dict]
    output: Callable[[object], torch.Tensor] = main_output
    swift: bool = False


def _peft_builder(case: ContractCase) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from peft import get_peft_model

        model = get_peft_model(case.make_model(), case.make_config())
        randomize_adapter(model, "default", seed=3)  # zero-initialised tuners get non-trivial gradients
        return model

    return build


def _swift_mix() -> nn.Module:
    model = Swift.prepare_model(
        tiny_llama(),
        {
            "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "adapter": AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
        },
    )
    randomize_adapter(model, "adapter", seed=3)
    return model


def _swift_neftune() -> nn.Module:
    return Swift.prepare_model(
        tiny_llama(),
        {
            "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "noise": NEFTuneConfig(noise_alpha=5.0),
        },
    )


# NEFTune alone has no weights to train: it is trained with LoRA in NEFTUNE_CASE
TUNER_CASES = [
    DistCase(c.id, _peft_builder(c), c.make_inputs, c.output) for c in ALL_CASES if c.id != "neftune-llama"
] + [DistCase("swift-lora+adapter-llama", _swift_mix, llama_inputs, swift=True)]
NEFTUNE_CASE = DistCase("swift-lora+neftune-llama", _swift_neftune, llama_inputs, swift=True)


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Training mode (LongLoRA's shifted attention, NEFTune's noise) without dropout, so runs are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def global_inputs(case: DistCase) -> dict:
    return case.make_inputs(batch=GLOBAL_BATCH)


def shard_inputs(inputs: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s contiguous share of every batched tensor (scalars such as a timestep are shared)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == GLOBAL_BATCH:
            value = value.chunk(world)[rank]
        out[key] = value
    return out


def loss_of(case: DistCase, model: nn.Module, inputs: dict) -> torch.Tensor:
    """A mean over the batch; the linear term keeps a gradient where outputs are normalised (ViT's final norm)."""
    out = case.output(model(**inputs)).float()
    direction = torch.sin(torch.arange(out.shape[-1], dtype=out.dtype) + 1.0)
    return out.pow(2).mean() + (out * direction).mean()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def train_single(case: DistCase, world: int = 2, steps: int = STEPS) -> nn.Module:
    """The reference: one process, the whole global batch (as ``world`` equal halves whose mean is the loss)."""
    model = prepare_for_training(case.build())
    optimizer = torch.optim.SGD(trainable(model), lr=LR)
    inputs = global_inputs(case)
    for _ in range(steps):
        loss = sum(loss_of(case, model, shard_inputs(inputs, r, world)) for r in range(world)) / world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def train_single_per_rank_rng(case: DistCase, seed: int, world: int = 2, steps: int = STEPS) -> nn.Module:
    """Like :func:`train_single`, but each half of the batch draws its randomness from its own generator state,
    seeded ``seed + rank`` as ``seed_per_rank`` does on each rank (NEFTune's noise)."""
    model = prepare_for_training(case.build())
    optimizer = torch.optim.SGD(trainable(model), lr=LR)
    inputs = global_inputs(case)
    states = []
    for r in range(world):
        torch.manual_seed(seed + r)
        states.append(torch.get_rng_state())
    for _ in range(steps):
        total = 0.0
        for r in range(world):
            torch.set_rng_state(states[r])
            total = total + loss_of(case, model, shard_inputs(inputs, r, world))
            states[r] = torch.get_rng_state()
        (total / world).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def lisa_model() -> nn.Module:
    return prepare_for_training(tiny_llama(num_layers=4))


def galore_model() -> nn.Module:
    return prepare_for_training(tiny_llama(num_layers=2))


GALORE_OPTIONS = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "rank": 4, "update_proj_gap": 2}
GALORE_LR = 1e-2
LISA_STEPS = 4


def causal_lm_loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"]).logits.float().pow(2).mean()
