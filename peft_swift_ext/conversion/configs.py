"""ms-swift ``adapter_config.json`` -> this package's (or PEFT's) config objects.

ms-swift writes ``swift_type`` for its own tuners and ``peft_type`` for PEFT's; the field names of most of its
tuners are ours already. The translations that differ (LoRA with LoRA+ options, LongLoRA, LLaMA-PRO) live here,
next to the generic one, so the tuner packages know nothing of ms-swift's file format.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path

from peft import LoraConfig, PeftConfig

from ..core.registry import config_class_for, spec_for_swift_type
from ..core.validators import check_field_types, is_number
from ..tuners.llamapro import LlamaProConfig
from ..tuners.longlora import LongLoraConfig
from ..tuners.lora_plus import LoraPlusConfig

# Keys of an ms-swift adapter_config.json that are SWIFT's bookkeeping, not fields of the tuner.
_BOOKKEEPING = ("swift_type", "peft_type", "model_key_mapping")
# SWIFT's LoRA options that PEFT's LoraConfig cannot express; a checkpoint that sets them is refused.
_SWIFT_ONLY_LORA_FIELDS = {"lora_dtype": None, "use_qa_lora": False, "use_merged_linear": False, "enable_lora": None}
_LORA_BOOKKEEPING = ("lorap_lr_ratio", "lorap_emb_lr")
# ms-swift LongLoRA fields with no effect here: the model family is detected from the attention interface, and
# LoRA+ learning rates are not part of LongLoRA (build LoRA+ groups separately if wanted).
_LONGLORA_IGNORED = ("model_type", "lorap_lr_ratio", "lorap_emb_lr")
# ms-swift LLaMA-PRO fields that carry no meaning here: the layer list is found structurally, not by model type.
_LLAMAPRO_IGNORED = ("model_type", "num_new_blocks", "num_groups")

Translation = Callable[[dict], tuple[type[PeftConfig], dict]]


def swift_fields(config: dict, config_name: str) -> dict:
    """An ms-swift config dict without ``swift_type`` / ``peft_type`` and the unused ``model_key_mapping``.

    Args:
        config: the ``adapter_config.json`` of an ms-swift checkpoint, as a dict.
        config_name: the config class's name, for the error message.

    Raises:
        ValueError: when the checkpoint relies on SWIFT's ``model_key_mapping``, which is not supported.
    """
    if config.get("model_key_mapping") is not None:
        raise ValueError(f"{config_name}: SWIFT's model_key_mapping is not supported; set target_modules instead")
    return {k: v for k, v in config.items() if k not in _BOOKKEEPING}


def lora_fields(config: dict) -> tuple[type[LoraConfig], dict]:
    """Map an ms-swift ``LoRAConfig`` dict to a config class and its fields.

    Plain LoRA when ``lorap_lr_ratio`` is unset, LoRA+ otherwise; SWIFT-only options that change the adapter
    (e.g. ``lora_dtype``) raise ``ValueError``.

    Args:
        config: the ``adapter_config.json`` of an ms-swift LoRA checkpoint.
    """
    set_options = {
        key: config[key] for key, default in _SWIFT_ONLY_LORA_FIELDS.items() if config.get(key, default) != default
    }
    if set_options:
        raise ValueError(f"SWIFT LoRA options without a PEFT equivalent are set: {set_options}")
    fields = swift_fields(config, "LoraConfig")
    fields = {k: v for k, v in fields.items() if k not in _LORA_BOOKKEEPING and k not in _SWIFT_ONLY_LORA_FIELDS}
    if config.get("lorap_lr_ratio") is None:
        return LoraConfig, fields
    fields["loraplus_lr_ratio"] = config["lorap_lr_ratio"]
    if config.get("lorap_emb_lr") is not None:
        fields["loraplus_lr_embedding"] = config["lorap_emb_lr"]
    return LoraPlusConfig, fields


def _longlora_fields(config: dict) -> tuple[type[PeftConfig], dict]:
    _, fields = lora_fields({k: v for k, v in config.items() if k not in _LONGLORA_IGNORED})
    return LongLoraConfig, fields


def _llamapro_fields(config: dict) -> tuple[type[PeftConfig], dict]:
    # ms-swift inserts one block after each of num_groups groups whatever num_new_blocks says, so its checkpoints
    # hold num_groups blocks; the translation describes exactly that.
    blocks = config.get("num_groups") or config.get("num_new_blocks")
    fields = {k: v for k, v in swift_fields(config, "LlamaProConfig").items() if k not in _LLAMAPRO_IGNORED}
    return LlamaProConfig, {**fields, "num_new_blocks": blocks, "num_groups": blocks}


#: registered tuner name -> translation of its ms-swift config; other tuners take SWIFT's fields as they are.
TRANSLATIONS: dict[str, Translation] = {
    "loraplus": lora_fields,
    "longlora": _longlora_fields,
    "llamapro": _llamapro_fields,
}


def is_swift_native(config_dict: dict) -> bool:
    """Whether a config written by ms-swift (a parsed ``adapter_config.json``) describes one of SWIFT's own tuners."""
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
        translate = TRANSLATIONS.get(spec.name)
        try:
            if translate is None:
                config_cls, fields = spec.config_cls, swift_fields(config_dict, spec.config_cls.__name__)
            else:
                config_cls, fields = translate(config_dict)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
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
    return checked_config(config_cls, {key: value for key, value in fields.items() if key in known}, source)


def checked_config(config_cls: type[PeftConfig], fields: dict, source: Path | str) -> PeftConfig:
    """``config_cls(**fields)`` (``peft_type`` is checked, then left to the class) after every check a file's fields
    get; errors name the file ``source``."""
    check_field_types(config_cls, fields, source)
    check_untrusted_fields(config_cls, fields, source)
    try:
        config = config_cls(**{key: value for key, value in fields.items() if key != "peft_type"})
    except Exception as error:  # a hostile value fails anywhere in a config's __post_init__ (OverflowError, ...)
        raise ValueError(f"{source}: invalid {config_cls.__name__}: {type(error).__name__}: {error}") from None
    check_lora_scale(config, source)
    return config


#: Largest LoRA scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) accepted from a file: the largest half-
#: precision number. Far beyond, the adapter's output drowns the base model's and gradients vanish behind norms.
MAX_LORA_SCALE = 65504.0


def check_untrusted_fields(config_cls: type, fields: dict, source: Path | str) -> None:
    """Refuse values a config file may not carry, though the config class would take them.

    NaN and infinities anywhere (JSON readers accept them, and one poisons every step it touches); dropout
    probabilities of 1 or more (the adapter would see only zeros in training, and never learn); negative token ids
    for aLoRA's invocation (they never occur, so the adapter would never act); and ``megatron_config``, which makes
    PEFT import the module that the file's ``megatron_core`` names. Errors name the file ``source``.
    """
    for name, value in fields.items():
        bad = _non_finite(value)
        if bad is not None:
            raise ValueError(f"{source}: field {name!r}{bad} of {config_cls.__name__} must be finite, got {value!r}")
        if "dropout" in name and is_number(value) and not 0 <= value < 1:
            raise ValueError(f"{source}: field {name!r} of {config_cls.__name__} must be in [0, 1), got {value!r}")
    if fields.get("megatron_config") is not None:
        raise ValueError(
            f"{source}: field 'megatron_config' is refused in files read here: it makes PEFT import the module the "
            "file names in 'megatron_core'; build a Megatron LoRA config in code instead"
        )
    tokens = fields.get("alora_invocation_tokens")
    if isinstance(tokens, list) and any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in tokens):
        raise ValueError(f"{source}: field 'alora_invocation_tokens' must list token ids (ints >= 0), got {tokens!r}")


def check_lora_scale(config: PeftConfig, source: Path | str) -> None:
    """Refuse a LoRA config whose scale ``lora_alpha / r`` (and that of each ``alpha_pattern`` entry) is 0 (the
    adapter would neither act nor train) or beyond :data:`MAX_LORA_SCALE`.

    Args:
        config: a built config; those without ``lora_alpha`` and ``r`` pass.
        source: the file, for the message.
    """
    rank, alpha = getattr(config, "r", None), getattr(config, "lora_alpha", None)
    if not (is_number(rank) and is_number(alpha)) or rank <= 0:
        return
    alphas = [("lora_alpha", alpha)]
    pattern = getattr(config, "alpha_pattern", None) or {}
    alphas += [(f"alpha_pattern[{key!r}]", value) for key, value in pattern.items() if is_number(value)]
    root = math.sqrt(rank) if getattr(config, "use_rslora", False) else rank
    for name, value in alphas:
        if value == 0 or abs(value / root) > MAX_LORA_SCALE:
            raise ValueError(
                f"{source}: {type(config).__name__}.{name}={value!r} gives the LoRA scale {value / root:g}; it must "
                f"be non-zero and at most {MAX_LORA_SCALE:g} in size"
            )


def _non_finite(value: object, path: str = "") -> str | None:
    """The path (``""``, ``"['key']"``, ``"[2]"``) to a NaN or infinity inside ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None
