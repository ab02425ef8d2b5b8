"""Reading and writing adapter folders (SWIFT's layout, PEFT's layout), safely and atomically.

SWIFT writes ``<dir>/<adapter>/adapter_config.json`` + ``adapter_model.safetensors`` per adapter, with the
adapter name kept in the keys; PEFT writes one adapter at the root (others in sub-folders) with the name
removed and a ``base_model.model.`` prefix. Everything here checks its input and names the file and field
at fault; pickles are only ever read with ``torch.load(weights_only=True)``. Writes are flushed to the disk
(:mod:`.transactions` replaces a checkpoint's entries with them crash-safely).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import transactions

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EXTRA_STATES_DIR = "extra_states"
#: The file at the root of a SwiftModel checkpoint that records the adapters' order (SWIFT's file name).
ORDER_FILE = "configuration.json"


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it can name an adapter and its checkpoint sub-folder, else raise ``ValueError``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if name in (".", "..") or any(sep in name for sep in separators) or "\0" in name or os.path.isabs(name):
        raise ValueError(f"adapter name {name!r} would escape the save directory; use a plain folder name")
    if name == EXTRA_STATES_DIR:
        raise ValueError(f"adapter name {name!r} is reserved for SWIFT's extra trainable weights")
    if name.startswith("."):  # hidden entries are bookkeeping (a save in progress): a loader skips them
        raise ValueError(f"adapter name {name!r} starts with '.', which a loader would skip; use a plain name")
    return name


def adapter_subfolder(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` after checking that it stays inside ``root`` (symlinks resolved)."""
    root_path = Path(root).resolve()
    folder = (root_path / check_adapter_name(name)).resolve()
    if folder.parent != root_path:
        raise ValueError(f"adapter folder {name!r} in {root} resolves to {folder}, outside the checkpoint directory")
    return folder


def read_json(path: Path) -> dict:
    """Load a JSON object from ``path`` with an error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors`` (or a ``.bin`` without unpickling code) from ``folder``."""
    safe_file = folder / SAFE_WEIGHTS_NAME
    pickle_file = folder / PICKLE_WEIGHTS_NAME
    if safe_file.is_file():
        try:
            return load_file(str(safe_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{safe_file} is not a readable safetensors file: {error}") from None
    if pickle_file.is_file():
        try:
            state = torch.load(str(pickle_file), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for hostile files
            raise ValueError(
                f"{pickle_file} cannot be loaded safely (only plain tensors are accepted): {error}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pickle_file} does not hold a flat mapping of tensor names to tensors")
        return state
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME} in {folder}")


def write_adapter_files(folder: Path, config_dict: dict, tensors: dict[str, torch.Tensor], safe: bool) -> None:
    """Write one adapter's config and weights into an existing (empty) ``folder``, flushed to the disk.

    Args:
        folder: the adapter's (staged) folder.
        config_dict: its ``adapter_config.json``.
        tensors: its weights.
        safe: safetensors, or a torch pickle of plain tensors.
    """
    write_config(folder / CONFIG_NAME, config_dict)
    write_weights(folder / (SAFE_WEIGHTS_NAME if safe else PICKLE_WEIGHTS_NAME), tensors, safe)


def write_config(path: Path, config_dict: dict) -> None:
    """Write ``config_dict`` as an ``adapter_config.json`` at ``path``, flushed to the disk."""
    write_text(path, json.dumps(config_dict, indent=2, sort_keys=True, default=_json_default))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk (one announced file-system change)."""
    path.write_text(text)
    transactions.fsync_path(path)


def write_weights(path: Path, tensors: dict[str, torch.Tensor], safe: bool) -> None:
    """Write tensors to ``path`` (safetensors or a torch pickle of plain tensors), flushed to the disk.

    Args:
        path: the file to write.
        tensors: the tensors by key.
        safe: safetensors (``metadata={"format": "pt"}``, as PEFT writes them) or a pickle.
    """
    contiguous = {key: tensor.detach().contiguous() for key, tensor in tensors.items()}
    if safe:
        save_file(contiguous, str(path), metadata={"format": "pt"})
    else:
        torch.save(contiguous, str(path))
    transactions.fsync_path(path)


def _json_default(value: object):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot store {type(value).__name__} in adapter_config.json")


def list_adapter_folders(root: Path) -> list[str]:
    """Names of the sub-folders of ``root`` that hold an adapter (SWIFT layout), sorted."""
    return sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir()
        and child.name != EXTRA_STATES_DIR
        and not child.name.startswith(".")
        and (child / CONFIG_NAME).is_file()
    )


def preview_keys(keys: list[str], limit: int = 6) -> str:
    """The first ``limit`` keys, comma-separated, and how many there are in all when that is more (for errors)."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
