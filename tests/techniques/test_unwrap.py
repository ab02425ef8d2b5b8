from peft import LoraConfig, get_peft_model
from torch import nn

from peft_swift_ext.techniques import unwrap_model


class _SwiftLikeWrapper(nn.Module):
    """Stands for SwiftModel, which exposes the wrapped model as `.base_model`."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model


def test_plain_transformers_model_is_kept_whole(llama):
    assert unwrap_model(llama) is llama  # not its headless `base_model` (LlamaModel)


def test_peft_and_swift_wrappers_are_removed(llama):
    peft_model = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_model(peft_model) is llama
    assert unwrap_model(_SwiftLikeWrapper(peft_model)) is llama
    assert unwrap_model(peft_model.base_model) is llama  # the LoraModel tuner alone


def test_model_without_wrappers_or_transformers_is_returned():
    module = nn.Linear(2, 2)
    assert unwrap_model(module) is module


def test_swift_model_is_unwrapped(llama):
    from peft_swift_ext.swift import Swift

    swift_model = Swift.prepare_model(llama, {"first": LoraConfig(r=2, target_modules=["q_proj"])})
    assert unwrap_model(swift_model) is llama
