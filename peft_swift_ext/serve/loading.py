"""Loading what the server serves: a base model from a local folder, and a folder of adapters on top of it.

Nothing is downloaded (``local_files_only=True``). The adapters folder's layout and the ``peft``, ``swift`` and
``auto`` backends are described in docs/guides/serving.md (*Starting the server*).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..swift import Swift
from .engine import BASE_MODEL_NAME, Engine, Row

CONFIG_NAME = "adapter_config.json"
BACKENDS = ("auto", "peft", "swift")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_adapters(folder: str | Path) -> dict[str, Path]:
    """Adapter name -> its folder: every sub-folder holding ``adapter_config.json``, and ``default`` at the root.

    Args:
        folder: the adapters folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--adapters: {root} is not a folder")
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():
        found["default"] = root
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / CONFIG_NAME).is_file():
            if child.name in found:
                raise ValueError(f"--adapters: {root} has both a root adapter and a sub-folder named 'default'")
            found[child.name] = child
    if not found:
        raise ValueError(f"--adapters: {root} holds no adapter ({CONFIG_NAME} at its root or in a sub-folder)")
    if BASE_MODEL_NAME in found:
        raise ValueError(f"--adapters: an adapter folder may not be named {BASE_MODEL_NAME!r} (it means 'no adapter')")
    return found


def adapter_types(adapters: dict[str, Path]) -> dict[str, str]:
    """Adapter name -> its ``peft_type`` (SWIFT's ``swift_type`` where a checkpoint from ms-swift has no peft_type).

    Args:
        adapters: what :func:`find_adapters` returned.
    """
    types: dict[str, str] = {}
    for name, folder in adapters.items():
        path = folder / CONFIG_NAME
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"--adapters: cannot read {path}: {error}") from None
        kind = (config.get("peft_type") or config.get("swift_type")) if isinstance(config, dict) else None
        if not isinstance(kind, str):
            raise ValueError(f"--adapters: {path} names no peft_type")
        types[name] = kind.upper()
    return types


def choose_backend(types: dict[str, str], requested: str = "auto") -> str:
    """``peft`` or ``swift``: the requested one, or for ``auto`` ``peft`` when every adapter is LoRA.

    Args:
        types: adapter name -> type, from :func:`adapter_types`.
        requested: ``auto``, ``peft`` or ``swift``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "peft" if all(kind == "LORA" for kind in types.values()) else "swift"
    if requested == "peft" and len(set(types.values())) > 1:
        raise ValueError(
            f"--backend peft: a PeftModel holds one adapter type, these adapters mix {sorted(set(types.values()))}; "
            "use --backend swift"
        )
    return requested


def load_base_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu"):
    """The causal LM and its tokenizer from a local folder (``local_files_only``: never downloads).

    Args:
        model_dir: a folder written by ``save_pretrained`` (config, weights, tokenizer files).
        dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the model (``cpu``, ``cuda``, ``cuda:1`` ...).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"--model: {folder} is not a local folder (the server loads local models only)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype])
    return model.to(device).eval(), tokenizer


def attach_adapters(
    model: torch.nn.Module, adapters_dir: str | Path, adapters: dict[str, Path], backend: str
) -> torch.nn.Module:
    """Load every adapter onto ``model`` with the chosen backend; returns the wrapping model.

    Args:
        model: the base model.
        adapters_dir: the adapters folder.
        adapters: name -> folder, from :func:`find_adapters` on ``adapters_dir``.
        backend: ``peft`` or ``swift`` (see :func:`choose_backend`).
    """
    if backend == "swift":
        return Swift.from_pretrained(model, Path(adapters_dir), adapter_name=list(adapters)).eval()
    if backend == "peft":
        # (importing this sub-package already imported peft_swift_ext, which registers its tuner types with PEFT)
        from peft import PeftModel

        names = list(adapters)
        loading = names[0]
        try:
            wrapped = PeftModel.from_pretrained(model, adapters[loading], adapter_name=loading)
            for loading in names[1:]:
                wrapped.load_adapter(adapters[loading], adapter_name=loading)
        except SafetensorError as error:  # PEFT's loader lets the reader's own error type through
            folder = adapters[loading]
            raise ValueError(f"--adapters: {folder} holds an unreadable safetensors file: {error}") from None
        return wrapped.eval()
    raise ValueError(f"backend must be 'peft' or 'swift', got {backend!r}")


def check_mixed_batches(engine: Engine) -> None:
    """Generate one token for a batch naming every model once; raise a clear error if the model cannot.

    Run at start-up, so a model without per-row ``adapter_names`` support fails before the server listens.

    Args:
        engine: the engine to check.
    """
    prompt = engine.encode("Hello") or [engine.pad_token_id]
    rows = [Row(name, tuple(prompt), 1) for name in engine.model_names]
    try:
        engine.generate(rows)
    except Exception as error:
        raise RuntimeError(
            f"the {engine.backend} model cannot run one batch with a different adapter per row "
            f"(generate(adapter_names=[...]) failed: {type(error).__name__}: {error})"
        ) from error


def load_engine(
    model_dir: str | Path,
    adapters_dir: str | Path,
    backend: str = "auto",
    dtype: str = "auto",
    device: str = "cpu",
) -> Engine:
    """Load the base model and every adapter, build the :class:`Engine`, and check it batches mixed adapters.

    Args:
        model_dir: the local base-model folder.
        adapters_dir: the adapters folder (one sub-folder per adapter).
        backend: ``auto``, ``peft`` or ``swift`` (see :func:`choose_backend`).
        dtype: the base model's dtype (see :func:`load_base_model`).
        device: where the model runs.
    """
    adapters = find_adapters(adapters_dir)
    types = adapter_types(adapters)
    chosen = choose_backend(types, backend)
    model, tokenizer = load_base_model(model_dir, dtype, device)
    wrapped = attach_adapters(model, adapters_dir, adapters, chosen)
    engine = Engine(wrapped, tokenizer, types, backend=chosen)
    check_mixed_batches(engine)
    return engine
