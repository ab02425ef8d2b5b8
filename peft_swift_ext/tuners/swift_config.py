"""What the plugin tuners' configs share: reading the ms-swift JSON of the same tuner."""

from __future__ import annotations

# Keys of an ms-swift adapter_config.json that are SWIFT's bookkeeping, not fields of the tuner.
_BOOKKEEPING = ("swift_type", "peft_type", "model_key_mapping")


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


class SwiftFieldsMixin:
    """For configs whose fields carry ms-swift's names: its JSON loads as it is, less SWIFT's bookkeeping."""

    @classmethod
    def from_swift_dict(cls, config: dict) -> tuple[type, dict]:
        """The fields of an ms-swift config JSON of this tuner (SWIFT's bookkeeping keys dropped).

        Args:
            config: the ``adapter_config.json`` of an ms-swift checkpoint, as a dict.

        Returns:
            This class and the keyword arguments to build it with.
        """
        return cls, swift_fields(config, cls.__name__)
