"""The ``Swift`` facade: SWIFT's static API over PEFT models and :class:`SwiftModel`."""

from __future__ import annotations

import os
from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model

from ..conversion import save_to_peft_format
from ..core import files
from .model import SwiftModel


class Swift:
    """SWIFT's entry points: prepare, load, merge and convert adapters."""

    @staticmethod
    def prepare_model(model, config: PeftConfig | dict[str, PeftConfig], **kwargs) -> PeftModel | SwiftModel:
        """Add tuners to a model.

        Args:
            model (nn.Module): a plain model, or a SwiftModel to add more adapters to.
            config: one PEFT config (returns PEFT's own ``PeftModel``, as SWIFT does for PEFT configs), or a
                dict ``{adapter_name: config}`` of any registered types (returns a ``SwiftModel``).
            **kwargs (Any): for a single config, passed to ``get_peft_model`` (e.g. ``adapter_name``); for a dict,
                ``per_thread``, ``low_cpu_mem_usage`` and ``autocast_adapter_dtype``.
        """
        if isinstance(config, PeftConfig) and not isinstance(model, SwiftModel):
            return get_peft_model(model, config, **kwargs)
        if isinstance(config, PeftConfig):
            config = {kwargs.pop("adapter_name", "default"): config}
        if not isinstance(config, dict) or not config:
            raise TypeError(f"config must be a PeftConfig or a non-empty dict of them, got {type(config).__name__}")
        for name, value in config.items():
            files.check_adapter_name(name)
            if not isinstance(value, PeftConfig):
                raise TypeError(f"config[{name!r}] must be a PeftConfig, got {type(value).__name__}")
        unknown = sorted(set(kwargs) - {"per_thread", "low_cpu_mem_usage", "autocast_adapter_dtype"})
        if unknown:
            raise TypeError(f"Swift.prepare_model got unexpected keyword arguments {unknown} for a dict of configs")
        swift_model = model if isinstance(model, SwiftModel) else SwiftModel(model, kwargs.pop("per_thread", None))
        duplicates = [name for name in config if name in swift_model.peft_config]
        if duplicates:
            raise ValueError(f"adapter(s) {duplicates} already exist; existing adapters: {swift_model.adapters}")
        with swift_model.adding_adapters():
            for name, value in config.items():
                swift_model.add_adapter(name, value, **kwargs)
                swift_model.activate_adapter(name)
        return swift_model

    @staticmethod
    def merge(model: PeftModel | SwiftModel, **kwargs) -> None:
        """Merge the active adapters into the base weights, keeping the adapter layers.

        Args:
            model: a SwiftModel or PeftModel.
            **kwargs (Any): ``adapter_names`` / ``safe_merge``, as the model's own merge takes them.
        """
        if isinstance(model, SwiftModel):
            model.merge(**kwargs)
        else:
            model.merge_adapter(**kwargs)

    @staticmethod
    def unmerge(model: PeftModel | SwiftModel) -> None:
        """Take merged adapters back out of the base weights.

        Args:
            model: a SwiftModel or PeftModel.
        """
        if isinstance(model, SwiftModel):
            model.unmerge()
        else:
            model.unmerge_adapter()

    @staticmethod
    def merge_and_unload(model: PeftModel | SwiftModel, **kwargs):
        """Merge the active adapters, remove all adapter layers, and return the plain model.

        Args:
            model: a SwiftModel or PeftModel.
            **kwargs (Any): passed to the model's ``merge_and_unload``.
        """
        return model.merge_and_unload(**kwargs)

    @staticmethod
    def save_to_peft_format(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
        """Convert a SWIFT-layout checkpoint of LoRA adapters into a folder plain PEFT loads.

        Adapter ``default`` goes to the root of ``output_dir``, others into sub-folders; keys lose the adapter
        name and gain ``base_model.model.``. Any non-LoRA adapter, or an option PEFT cannot express, is an
        error raised before anything is written.

        Args:
            ckpt_dir: the folder written by ``SwiftModel.save_pretrained`` or by ms-swift.
            output_dir: where to write (created if needed). Only the converted adapters' entries are replaced, as one
                crash-safe unit; other content is kept, and an output that overlaps ``ckpt_dir`` is refused.
        """
        save_to_peft_format(ckpt_dir, output_dir)

    @staticmethod
    def from_pretrained(
        model,
        model_id: str | os.PathLike,
        adapter_name: str | list[str] | dict[str, str] | None = None,
        revision: str | None = None,
        is_trainable: bool = False,
        **kwargs,
    ) -> SwiftModel:
        """Load adapters saved by this package, by PEFT, or by ms-swift onto ``model``.

        Everything is read and checked before the model changes; if anything fails the model is as before.

        Args:
            model (nn.Module): a plain model or a SwiftModel (loading can be repeated).
            model_id: a local checkpoint folder, or a Hugging Face Hub id (needs the hub to be reachable).
            adapter_name: ``None`` loads every adapter found; a name or list selects; a dict renames
                ``{saved name: new name}``.
            revision: the hub revision, for hub ids.
            is_trainable: whether the loaded adapters require grad.
            **kwargs (Any): ``per_thread``, ``low_cpu_mem_usage``.
        """
        root = _resolve_checkpoint(model_id, revision)
        unknown = sorted(set(kwargs) - {"per_thread", "low_cpu_mem_usage"})
        if unknown:
            raise TypeError(f"Swift.from_pretrained got unexpected keyword arguments {unknown}")
        return SwiftModel.from_pretrained(model, root, adapter_name, is_trainable, **kwargs)


def _resolve_checkpoint(model_id: str | os.PathLike, revision: str | None) -> Path:
    path = Path(model_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained needs the checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_id), revision=revision))
    except Exception as error:  # offline, unknown repo, no huggingface_hub...: one clear message
        raise ValueError(
            f"{str(model_id)!r} is not a local directory, and it could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {error})"
        ) from None
