"""Reading and writing adapter folders (SWIFT's layout, PEFT's layout), safely and atomically.

SWIFT writes ``<dir>/<adapter>/adapter_config.json`` + ``adapter_model.safetensors`` per adapter, with the
adapter name kept in the keys; PEFT writes one adapter at the root (others in sub-folders) with the name
removed and a ``base_model.model.`` prefix. Everything here checks its input and names the file and field
at fault; pickles are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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
    """Write one adapter's config and weights into an existing (empty) ``folder``."""
    (folder / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=_json_default))
    contiguous = {key: tensor.detach().contiguous() for key, tensor in tensors.items()}
    if safe:
        save_file(contiguous, str(folder / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(contiguous, str(folder / PICKLE_WEIGHTS_NAME))


def _json_default(value: object):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot store {type(value).__name__} in adapter_config.json")


@contextmanager
def staging_directory(target: str | os.PathLike):
    """Yield a fresh temporary sibling folder of ``target``, removed afterwards whatever happens.

    Being a sibling keeps the final moves into ``target`` renames on one file system.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a folder to fill; on success it replaces ``target`` whole, on failure ``target`` is untouched."""
    with staging_directory(target) as staging:
        content = staging / "content"
        content.mkdir()
        yield content
        replace_paths([(content, Path(target))])


def replace_paths(moves: list[tuple[Path, Path]]) -> None:
    """Move each staged ``source`` onto its ``target`` (folder or file), all or nothing.

    Each existing target is first renamed aside; if any move fails, the targets already replaced are put
    back, so a checkpoint is never left half old, half new. The renamed-aside copies go once all moves
    succeeded.
    """
    done: list[tuple[Path, Path | None]] = []
    try:
        for source, target in moves:
            retired = _aside(target) if target.exists() else None
            if retired is not None:
                os.replace(target, retired)
            done.append((target, retired))
            os.replace(source, target)
    except BaseException:
        for target, retired in reversed(done):
            if target.exists():  # the new content made it in (the old one, if any, is parked aside)
                _remove(target)
            if retired is not None:
                os.replace(retired, target)
        raise
    for _, retired in done:
        if retired is not None:
            _remove(retired)


def _aside(target: Path) -> Path:
    """A fresh sibling name to park ``target`` under while it is being replaced."""
    return Path(tempfile.mktemp(prefix=f".{target.name}.old-", dir=target.parent))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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
