"""Reading and writing adapter folders: SWIFT's layout, PEFT's layout, safely and atomically.

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
import types
import typing
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..registry import config_class_for, spec_for_swift_type

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EXTRA_STATES_DIR = "extra_states"
ROOT_MARKER = "configuration.json"


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


def is_swift_native(config_dict: dict) -> bool:
    """Whether a config written by ms-swift describes one of SWIFT's own tuner types."""
    return "swift_type" in config_dict


def config_from_dict(config_dict: dict, source: Path | str) -> PeftConfig:
    """Build the config object an ``adapter_config.json`` describes.

    ``swift_type`` configs (ms-swift) map to the registered tuner that reads them; ``peft_type`` configs to
    PEFT's registry. Field types are checked against the dataclass, so a hostile or broken file fails
    here, naming the file and field, rather than deep inside a model.

    Args:
        config_dict: the parsed JSON.
        source: the file it came from, for error messages.
    """
    if is_swift_native(config_dict):
        spec = spec_for_swift_type(str(config_dict["swift_type"]))
        if spec is None:
            raise ValueError(f"{source}: unknown swift_type {config_dict['swift_type']!r}")
        from_swift = getattr(spec.config_cls, "from_swift_dict", None)
        if from_swift is None:
            config_cls, fields = spec.config_cls, _without(config_dict, "swift_type", "peft_type")
        else:
            config_cls, fields = from_swift(config_dict)
    elif "peft_type" in config_dict:
        try:
            config_cls = config_class_for(config_dict["peft_type"])
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        fields = dict(config_dict)
    else:
        raise ValueError(f"{source}: neither 'peft_type' nor 'swift_type' is set, so the tuner type is unknown")
    known = {field.name for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        warnings.warn(
            f"{source}: ignoring fields {config_cls.__name__} does not have: {', '.join(unknown)}", stacklevel=3
        )
    fields = {key: value for key, value in fields.items() if key in known}
    check_field_types(config_cls, fields, source)
    fields.pop("peft_type", None)
    try:
        return config_cls(**fields)
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise ValueError(f"{source}: invalid {config_cls.__name__}: {error}") from None


def _without(mapping: dict, *keys: str) -> dict:
    return {key: value for key, value in mapping.items() if key not in keys}


def check_field_types(config_cls: type, fields: dict, source: Path | str) -> None:
    """Raise ``ValueError`` naming the field when a value does not fit the dataclass annotation."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # unresolvable forward references: skip the check rather than refuse a valid config
        return
    for name, value in fields.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            raise ValueError(
                f"{source}: field {name!r} of {config_cls.__name__} has a {type(value).__name__} "
                f"value {value!r}, which does not fit {_hint_name(hint)}"
            )


def _fits(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        item_hint = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else None
        return item_hint is None or all(_fits(item, item_hint) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, str) and hint is not str:  # str enums such as PeftType / TaskType
            return isinstance(value, str)
        return isinstance(value, hint)
    return True


def _hint_name(hint: object) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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


# --- conversion to PEFT's layout -------------------------------------------------------------------------------

_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def swift_lora_key_to_peft(key: str, adapter_name: str) -> str:
    """Rewrite one SWIFT-layout LoRA key into PEFT's layout (adapter name out, ``base_model.model.`` in)."""
    for container in _LORA_CONTAINERS:
        key = key.replace(f".{container}.{adapter_name}.", f".{container}.")
        if key.endswith(f".{container}.{adapter_name}"):
            key = key[: -len(adapter_name) - 1]
    if not key.startswith("base_model.model."):
        key = "base_model.model." + key
    return key


def save_to_peft_format(
    ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike, to_peft_config: Callable[[dict, Path], dict]
) -> None:
    """Convert a SWIFT-layout checkpoint of LoRA adapters into a folder plain PEFT loads.

    Everything is checked before anything is written, and the output appears atomically.

    Args:
        ckpt_dir: the folder written by ``SwiftModel.save_pretrained`` (or ms-swift).
        output_dir: where to write; adapter ``default`` goes to its root, others into sub-folders.
        to_peft_config: turns one adapter's config dict into a PEFT ``LoraConfig`` dict, raising
            ``ValueError`` for anything PEFT cannot express.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    if (ckpt / EXTRA_STATES_DIR).exists():
        raise ValueError(f"{ckpt / EXTRA_STATES_DIR}: extra trainable weights have no equivalent in PEFT's format")
    if (ckpt / CONFIG_NAME).is_file() and not list_adapter_folders(ckpt):
        raise ValueError(f"{ckpt} is already in PEFT's format (adapter_config.json at its root)")
    names = list_adapter_folders(ckpt)
    if not names:
        raise ValueError(f"{ckpt} holds no adapter folders (sub-folders with {CONFIG_NAME})")
    converted: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
    for name in names:
        folder = adapter_subfolder(ckpt, name)
        config = to_peft_config(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
        weights = {swift_lora_key_to_peft(key, name): value for key, value in read_weights(folder).items()}
        converted[name] = (config, weights)
    with atomic_directory(output_dir) as staging:
        for name, (config, weights) in converted.items():
            folder = staging if name == "default" else staging / name
            folder.mkdir(exist_ok=True)
            write_adapter_files(folder, config, weights, safe=True)
