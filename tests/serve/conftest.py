import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run the tiny models on one thread: faster for them, and immune to OpenMP spin-waiting on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Three LoRA adapters on different modules, ranks and seeds, so that their greedy completions differ.
ADAPTERS = {
    "alpha": (["q_proj", "v_proj"], 4, 101),
    "beta": (["o_proj", "down_proj"], 8, 102),
    "gamma": (["k_proj", "up_proj", "gate_proj"], 4, 103),
}


def build_serving_files(root: Path) -> tuple[Path, Path]:
    """A tiny seeded Llama with its character tokenizer in ``root/model``, and adapters of three types in
    ``root/adapters`` (SWIFT's layout, as ``SwiftModel.save_pretrained`` writes it): LoRA ``alpha``, Adapter
    ``beta`` and Prompt ``gamma``, with random weights so that each changes what the model generates.
    """
    from peft import LoraConfig

    from peft_swift_ext import AdapterConfig, Swift
    from peft_swift_ext.demo.models import load_tiny

    from ..helpers import randomize_adapter
    from ..tiny_models import llama_deep_prompt

    model_dir, adapters_dir = root / "model", root / "adapters"
    tiny = load_tiny(seed=0)
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    configs = {
        "alpha": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "beta": AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8),
        "gamma": llama_deep_prompt(3),
    }
    model = Swift.prepare_model(load_tiny(seed=0).model, configs)
    for seed, name in enumerate(configs, start=101):
        randomize_adapter(model, name, seed, scale=0.3)
    model.save_pretrained(adapters_dir)
    return model_dir, adapters_dir


def build_lora_serving_files(root: Path) -> tuple[Path, Path]:
    """The same tiny model with three LoRA adapters in PEFT's layout (served by a ``PeftModel``).

    The adapters' B matrices are random (``init_lora_weights=False``), so each changes what the model generates.
    """
    from peft import LoraConfig, get_peft_model

    from peft_swift_ext.demo.models import load_tiny

    model_dir, adapters_dir = root / "model", root / "adapters"
    tiny = load_tiny(seed=0)
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    for name, (targets, rank, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(load_tiny(seed=0).model, config, adapter_name=name)
        staging = root / "staging" / name
        peft_model.save_pretrained(staging)
        # PEFT writes a non-default adapter into a sub-folder named after it
        shutil.copytree(staging / name, adapters_dir / name)
    return model_dir, adapters_dir


@pytest.fixture(scope="session")
def serving_files(tmp_path_factory) -> tuple[Path, Path]:
    return build_serving_files(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def lora_serving_files(tmp_path_factory) -> tuple[Path, Path]:
    return build_lora_serving_files(tmp_path_factory.mktemp("serving-lora"))
