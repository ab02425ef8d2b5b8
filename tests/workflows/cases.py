"""What a user trains with the HF Trainer, per tuner: a tiny model with a loss, a dataset, the adapters' configs.

Every case builds through both entry points: ``get_peft_model`` (a ``PeftModel`` of one tuner) and
``Swift.prepare_model`` with a dict (a ``SwiftModel``). Causal LMs come with tied and untied embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

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
    Swift,
)

from ..tiny_models import llama_deep_prompt, tiny_llama, tiny_unet


@dataclass
class Workflow:
    """One training setup.

    Args:
        id: test id.
        make_model: a fresh seeded model with a loss (same weights on every call).
        configs: adapter name -> config factory; one entry for the ``get_peft_model`` entry point.
        make_dataset: the training examples (lists of tensors keyed like the model's forward arguments).
        compute_loss: the Trainer's ``compute_loss_func`` for models that compute no loss themselves.
        lisa: the model trains with ``LisaCallback`` (LISA adapters).
        tied: tied input / output embeddings (causal LMs).
    """

    id: str
    make_model: Callable[[], nn.Module]
    configs: dict[str, Callable[[], PeftConfig]]
    make_dataset: Callable[[], list[dict]]
    compute_loss: Callable | None = None
    lisa: bool = False
    tied: bool | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def build(self, entry: str) -> nn.Module:
        """The model with its adapters, through ``get_peft_model`` (``"peft"``) or ``Swift.prepare_model``."""
        torch.manual_seed(0)
        model = self.make_model()
        configs = {name: make() for name, make in self.configs.items()}
        if entry == "peft":
            (config,) = configs.values()
            return get_peft_model(model, config)
        return Swift.prepare_model(model, configs)


def _llama(tied: bool, num_layers: int = 2) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return tiny_llama(num_layers=num_layers, tie_word_embeddings=tied).train()

    return make


def _lm_dataset() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (8, 12), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=3,
    )
    return ViTForImageClassification(config).train()


def _image_dataset() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    return [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]


def _unet() -> nn.Module:
    return tiny_unet().train()


def _unet_dataset() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    return [
        {
            "sample": torch.randn(4, 8, 8, generator=generator),
            "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(5, 32, generator=generator),
            "labels": torch.randn(4, 8, 8, generator=generator),
        }
        for _ in range(8)
    ]


def _denoising_loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    return F.mse_loss(outputs.sample, labels)


def _lm_configs() -> dict[str, dict[str, Callable[[], PeftConfig]]]:
    return {
        "loraplus": {"lora": lambda: LoraPlusConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
        "lora": {"lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)},
        "adapter": {"adapter": lambda: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8)},
        "prompt": {"prompt": lambda: llama_deep_prompt()},
        "longlora": {"longlora": lambda: LongLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
        "side": {"side": lambda: SideConfig(dim=32, target_modules=["mlp"], side_module_name="mlp")},
        # SWIFT's favourite mix: LoRA+ with an Adapter on each MLP and NEFTune noise on the embeddings
        "loraplus+adapter+neftune": {
            "lora": lambda: LoraPlusConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "adapter": lambda: AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
            "noise": lambda: NEFTuneConfig(noise_alpha=5.0),
        },
    }


def _workflows() -> list[Workflow]:
    found = []
    for tied in (False, True):
        suffix = "tied" if tied else "untied"
        for name, configs in _lm_configs().items():
            found.append(Workflow(f"{name}-llama-{suffix}", _llama(tied), configs, _lm_dataset, tied=tied))
        found.append(
            Workflow(
                f"llamapro-llama-{suffix}",
                _llama(tied, num_layers=4),
                {"pro": lambda: LlamaProConfig(num_new_blocks=2)},
                _lm_dataset,
                tied=tied,
            )
        )
        found.append(
            Workflow(
                f"lisa-llama-{suffix}",
                _llama(tied, num_layers=4),
                {"lisa": lambda: LisaConfig(n_layers=1, interval=2, seed=3)},
                _lm_dataset,
                lisa=True,
                tied=tied,
            )
        )
    found += [
        Workflow(
            "vpt-vit",
            _vit,
            {
                "vpt": lambda: PromptConfig(
                    dim=32, target_modules=r"vit\.layers\.\d+", embedding_pos=0, prompt_length=4
                )
            },
            _image_dataset,
        ),
        Workflow(
            "restuning-vit",
            _vit,
            {
                "res": lambda: ResTuningConfig(
                    dims=32,
                    root_modules=r"vit\.layers\.0",
                    stem_modules=r"vit\.layers\.\d+",
                    target_modules=r"vit\.layernorm",
                    tuner_cfg="res_adapter",
                )
            },
            _image_dataset,
        ),
        Workflow(
            "adapter-vit",
            _vit,
            {"adapter": lambda: AdapterConfig(dim=32, target_modules=r"vit\.layers\.\d+\.mlp", adapter_length=8)},
            _image_dataset,
        ),
        Workflow(
            "scedit-unet",
            _unet,
            {"scedit": lambda: SCEditConfig(dims=[64, 32, 32, 32], target_modules=r"up_blocks\.\d+\.resnets\.\d+")},
            _unet_dataset,
            compute_loss=_denoising_loss,
        ),
    ]
    return found


WORKFLOWS = _workflows()
ENTRIES = ("peft", "swift")


def entry_points(workflow: Workflow) -> list[str]:
    """The entry points a workflow runs through (a mix of several adapters needs a SwiftModel)."""
    return list(ENTRIES) if len(workflow.configs) == 1 else ["swift"]


def parametrize() -> list[tuple[Workflow, str]]:
    """``(workflow, entry)`` pairs for ``pytest.mark.parametrize``."""
    return [(workflow, entry) for workflow in WORKFLOWS for entry in entry_points(workflow)]


def ids() -> list[str]:
    """Test ids matching :func:`parametrize`."""
    return [f"{workflow.id}-{entry}" for workflow, entry in parametrize()]
