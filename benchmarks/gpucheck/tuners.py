"""Every tuner trained a few steps in bf16 / fp16 on the device against a CPU float32 run of the same steps.

Recipes (the ones users run):

- **bf16**: the base model cast to bf16 before ``get_peft_model``; adapters get the dtype the tuner gives them
  (PEFT upcasts adapter weights to float32; full-weight trainables such as LLaMA-PRO's new blocks, LongLoRA's
  embeddings and norms, LISA's layers stay bf16); forward under ``torch.autocast(bfloat16)``; AdamW.
- **fp16**: the same with float16, then PEFT's ``cast_mixed_precision_params`` (frozen weights fp16, trainable
  weights float32, which ``GradScaler`` needs); forward under ``torch.autocast(float16)``; ``GradScaler``.

The reference is the same tuner built on the CPU in float32 and loaded with the device model's weights (the
half-precision values, exactly representable in float32), so both start from the same weights and differ only in
arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import cast_mixed_precision_params

from peft_swift_ext import (
    AdapterConfig,
    LisaConfig,
    LlamaProConfig,
    LongLoraConfig,
    LoraPlusConfig,
    NEFTuneConfig,
    PromptConfig,
    ResTuningConfig,
    SCEditConfig,
    SideConfig,
    create_lora_plus_optimizer,
)
from peft_swift_ext.techniques import LisaScheduler
from peft_swift_ext.tuners.neftune.layer import NEFTuneEmbedding, NEFTuneNoise

from . import models
from .common import (
    Metric,
    Row,
    guarded,
    is_cuda,
    max_relative_step_error,
    measure_cost,
    ratio,
    relative_error,
    release,
    resident_bytes,
)

LR = 1e-3
# Relative errors against the CPU float32 run. bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3), fp16 11
# (2^-12 ≈ 2.4e-4); after a few layers and steps errors of a few units of roundoff per operation add up, so the
# bounds sit about ten roundoffs above: loss per step, and the step-0 gradient of all trainable tensors together.
TOLERANCES = {
    torch.bfloat16: {"loss": 2e-2, "grad": 6e-2},
    torch.float16: {"loss": 5e-3, "grad": 1.5e-2},
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
    "unet": ["to_q", "to_v"],
}


@dataclass
class TunerSpec:
    """One tuner on one model family.

    Args:
        name: row id prefix.
        family: model family (see models.build).
        make_config: PEFT config for a model of the given size.
        note: what the row trains, for the table.
        full_weights: the base model (not only an adapter) trains: NEFTune is used with full fine-tuning.
    """

    name: str
    family: str
    make_config: Callable[[dict], object]
    note: str
    full_weights: bool = False
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None
    lisa: bool = False
    extra: dict = field(default_factory=dict)


def _lora(family):
    return lambda size: LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[family])


def _scedit(size):
    names, dims = models.unet_skip_dims(size)
    return SCEditConfig(dims=dims, target_modules=names)


SPECS = [
    TunerSpec("lora-llama", "llama", _lora("llama"), "PEFT LoRA r=8 on q,v (the ratio reference)"),
    TunerSpec("lora-bert", "bert", _lora("bert"), "PEFT LoRA r=8 on query,value (the ratio reference)"),
    TunerSpec("lora-vit", "vit", _lora("vit"), "PEFT LoRA r=8 on q_proj,v_proj (the ratio reference)"),
    TunerSpec("lora-unet", "unet", _lora("unet"), "PEFT LoRA r=8 on to_q,to_v (the ratio reference)"),
    TunerSpec(
        "loraplus-llama",
        "llama",
        lambda size: LoraPlusConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16.0),
        "LoRA+ r=8 on q,v, ratio 16, create_lora_plus_optimizer",
        optimizer=lambda model: create_lora_plus_optimizer(model, lr=LR),
    ),  # fmt: skip
    TunerSpec(
        "adapter-llama",
        "llama",
        lambda size: AdapterConfig(dim=size["hidden"], target_modules=["mlp"], adapter_length=size["hidden"] // 4),
        "Adapter on every MLP",
    ),  # fmt: skip
    TunerSpec(
        "prompt-bert",
        "bert",
        lambda size: PromptConfig(
            dim=size["hidden"],
            target_modules=r"encoder\.layer\.\d+",
            embedding_pos=0,
            attention_mask_pos=1,
            prompt_length=8,
            extract_embedding=True,
        ),
        "deep Prompt, 8 tokens, padded batch",
    ),  # fmt: skip
    TunerSpec(
        "side-bert",
        "bert",
        lambda size: SideConfig(
            dim=size["hidden"],
            target_modules=r"encoder\.layer\.\d+\.output",
            side_module_name="mlp",
            source_hidden_pos=1,
        ),
        "Side MLP on every layer output",
    ),  # fmt: skip
    TunerSpec(
        "restuning-vit",
        "vit",
        lambda size: ResTuningConfig(
            dims=size["hidden"],
            root_modules=r"layers\.0",
            stem_modules=r"layers\.\d+",
            target_modules="layernorm",
            tuner_cfg="res_adapter",
        ),
        "Res-Tuning res_adapter bypass into the final norm",
    ),  # fmt: skip
    TunerSpec("scedit-unet", "unet", _scedit, "SCEdit on every up-block resnet"),
    TunerSpec(
        "llamapro-llama", "llama", lambda size: LlamaProConfig(num_new_blocks=2), "LLaMA-PRO, 2 new blocks trained"
    ),
    TunerSpec(
        "longlora-llama",
        "llama",
        lambda size: LongLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "LongLoRA r=8 on q,v + embeddings and norms, S²-attention (groups of L/4)",
    ),  # fmt: skip
    TunerSpec(
        "neftune-llama",
        "llama",
        lambda size: NEFTuneConfig(noise_alpha=5.0),
        "NEFTune alpha=5 with full fine-tuning (no adapter weights)",
        full_weights=True,
    ),  # fmt: skip
    TunerSpec(
        "lisa-llama",
        "llama",
        lambda size: LisaConfig(n_layers=1, interval=2, seed=0),
        "LISA, 1 of 4 layers drawn every 2 steps, + embeddings and head",
        lisa=True,
    ),  # fmt: skip
]


def make_tuned(spec: TunerSpec, size: dict, device, dtype: torch.dtype) -> torch.nn.Module:
    """The base built on ``device``, cast to ``dtype``, then tuned as a user would (see the module docstring)."""
    with torch.device(device):
        base = models.build(spec.family, size)
    base = base.to(dtype)
    torch.manual_seed(1)
    model = get_peft_model(base, spec.make_config(size))
    if spec.full_weights:
        model.get_base_model().requires_grad_(True)
    if dtype == torch.float16:
        cast_mixed_precision_params(model, dtype)
    return model.train()


class Trainer:
    """A training loop for one model: optimizer, LISA scheduler, autocast and loss scaling as the recipe says."""

    def __init__(self, spec: TunerSpec, model, device, autocast_dtype: torch.dtype | None):
        self.spec, self.model, self.device, self.dtype = spec, model, torch.device(device), autocast_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = spec.optimizer(model) if spec.optimizer else torch.optim.AdamW(params, lr=LR)
        self.scheduler = LisaScheduler(model, optimizer=self.optimizer) if spec.lisa else None
        use_scaler = autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**10) if use_scaler else None
        self.skipped_steps = 0

    def forward_backward(self, batch: dict) -> torch.Tensor:
        if self.scheduler is not None:
            self.scheduler.step()
        context = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        )
        with context:
            loss = models.loss_of(self.spec.family, self.model(**batch))
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return loss

    def update(self) -> None:
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: dict) -> torch.Tensor:
        loss = self.forward_backward(batch)
        self.update()
        return loss


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def flat_grads(model) -> torch.Tensor:
    grads = [p.grad.detach().float().cpu().flatten() for p in trainable(model).values() if p.grad is not None]
    return torch.cat(grads) if grads else torch.zeros(0)


def missing_grads(model) -> list[str]:
    """Trainable tensors that received no gradient or a non-finite one."""
    return [n for n, p in trainable(model).items() if p.grad is None or not torch.isfinite(p.grad).all()]


@contextlib.contextmanager
def same_neftune_noise(seed: int = 1234):
    """NEFTune's noise drawn from one seeded CPU generator, so the CPU and device runs add the same noise.

    The package's own noise (drawn on the device) is checked separately, in ``neftune_noise_rows``.
    """
    generator = torch.Generator().manual_seed(seed)
    original = NEFTuneNoise.forward

    def forward(self, embeddings):
        m = self.magnitude(embeddings)
        noise = torch.rand(embeddings.shape, generator=generator, dtype=torch.float32).mul_(2 * m).sub_(m)
        return noise.to(embeddings.device, embeddings.dtype)

    NEFTuneNoise.forward = forward
    try:
        yield
    finally:
        NEFTuneNoise.forward = original


def run_steps(spec: TunerSpec, model, device, autocast_dtype, batches: list[dict]) -> dict:
    """Train on ``batches`` (one step each); losses, step-0 gradients and the gradient bookkeeping."""
    trainer = Trainer(spec, model, device, autocast_dtype)
    losses, missing, grads0 = [], set(), None
    with same_neftune_noise() if spec.name.startswith("neftune") else contextlib.nullcontext():
        for index, batch in enumerate(batches):
            loss = trainer.forward_backward(batch)
            losses.append(loss.item())
            missing.update(missing_grads(model))
            if index == 0:
                grads0 = flat_grads(model)
            trainer.update()
    return {"losses": losses, "missing": sorted(missing), "grads0": grads0, "skipped": trainer.skipped_steps}


def correctness(spec: TunerSpec, size: dict, device, dtype: torch.dtype, steps: int) -> tuple[list[Metric], dict]:
    """Train ``steps`` steps on the device in ``dtype`` and on the CPU in float32 from the same weights."""
    model = make_tuned(spec, size, device, dtype)
    # Built again on the CPU and loaded, not deep-copied: a copy of a LongLoRA model loses its S²-attention switch
    # (registered by the id of the model config), so it would silently train with full attention.
    reference = make_tuned(spec, size, "cpu", torch.float32)
    reference.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, strict=True)
    batches = [models.batch(spec.family, size, "cpu", seed=s) for s in range(steps)]
    ref = run_steps(spec, reference, "cpu", None, batches)
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
    dev = run_steps(spec, model, device, dtype, on_device)
    tol = TOLERANCES[dtype]
    trainable_count = len(trainable(model)) if not spec.lisa else "varies (LISA)"
    metrics = [
        Metric("loss", max_relative_step_error(dev["losses"], ref["losses"]), tol["loss"]),
        Metric("grad0", relative_error(dev["grads0"], ref["grads0"]), tol["grad"]),
        Metric("no-grad tensors", float(len(dev["missing"])), 0.0),
    ]
    details = {
        "device_losses": dev["losses"],
        "cpu_fp32_losses": ref["losses"],
        "tensors_without_finite_grad": dev["missing"][:10],
        "trainable_tensors": trainable_count,
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable(model).values()}),
        "grad0_norm": float(dev["grads0"].norm()) if dev["grads0"].numel() else 0.0,
        "scaler_skipped_steps": dev["skipped"],
    }
    del model, reference
    release(device)
    return metrics, details


def cost(spec: TunerSpec, size: dict, device, dtype: torch.dtype, warmup: int, repeats: int):
    """Median step time and peak memory at ``size`` (the tuner's real noise and draws, nothing patched)."""
    release(device)
    baseline = torch.cuda.memory_allocated() if is_cuda(device) else 0
    model = make_tuned(spec, size, device, dtype)
    trainer = Trainer(spec, model, device, dtype)
    batch = models.batch(spec.family, size, device)

    def resident():
        return resident_bytes(model, trainer.optimizer)

    # The model and optimizer go with this frame; the next configuration's release() frees their memory.
    return measure_cost(lambda: trainer.step(batch), device, warmup, repeats, baseline, resident)


def tuner_rows(device, dtypes, check_size: dict, bench_size: dict, steps: int, warmup: int, repeats: int, log):
    """One row per tuner and dtype: correctness at the check size, cost ratios vs LoRA at the bench size."""
    rows, lora_cost = [], {}
    for dtype in dtypes:
        for spec in SPECS:
            check = f"{spec.name}/{DTYPE_NAMES[dtype]}"

            def one(spec=spec, dtype=dtype, check=check):
                metrics, details = correctness(spec, check_size[spec.family], device, dtype, steps)
                spent = cost(spec, bench_size[spec.family], device, dtype, warmup, repeats)
                details["bench"] = spent.to_json()
                reference = f"lora-{spec.family}/{DTYPE_NAMES[dtype]}"
                if spec.name.startswith("lora-"):
                    lora_cost[(spec.family, dtype)] = spent
                base = lora_cost.get((spec.family, dtype))
                row = Row(
                    check, spec.note, f"CPU float32, same weights, {steps} AdamW steps", metrics,
                    ratio_reference=reference, details=details,
                )  # fmt: skip
                if base is not None:
                    row.step_ratio = ratio(spent.step_s, base.step_s)
                    row.memory_ratio = ratio(spent.peak_bytes, base.peak_bytes)
                return [row]

            new = guarded(check, spec.note, one)
            rows += new
            log(new)
    return rows


def neftune_noise_rows(device, size: dict) -> list[Row]:
    """NEFTune's own noise, drawn on the device: within ±alpha/sqrt(L·d), with a uniform's standard deviation."""

    def one():
        spec = next(s for s in SPECS if s.name == "neftune-llama")
        with torch.device(device):
            base = models.build("llama", size)
        model = get_peft_model(base, spec.make_config(size)).train()
        layer = next(m for m in model.modules() if isinstance(m, NEFTuneEmbedding))
        ids = torch.randint(0, size["vocab"], (8, 4 * size["seq"]), generator=torch.Generator().manual_seed(3))
        ids = ids.to(device)
        with torch.no_grad():
            noise = (layer(ids) - layer.get_base_layer()(ids)).double()
        m = layer.neftune_noise["default"].magnitude(noise)
        # fp32 rounding of (embedding + noise) - embedding: a few ulps of values below ~0.1 + m.
        bound = noise.abs().max().item() / m - 1
        std = noise.std().item() / (m / 3**0.5) - 1
        mean = noise.mean().abs().item() / (m / 3**0.5)
        n = noise.numel()
        metrics = [
            Metric("max|noise|/m - 1", bound, 1e-5),
            # The sample std of n uniforms errs by about 0.45/sqrt(n) relatively; the bound is ten times that.
            Metric("|std/(m/√3) - 1|", abs(std), 4.5 / n**0.5),
            Metric("|mean|/(m/√3)", mean, 10 / n**0.5),
        ]
        return [
            Row(
                "neftune-noise", f"NEFTune's noise drawn on {torch.device(device).type} ({n} values, fp32)",
                "Uniform(-m, m), m = alpha/sqrt(L·d)", metrics, details={"m": m, "values": n},
            )
        ]  # fmt: skip

    return guarded("neftune-noise", "NEFTune's noise on the device", one)
