import sys

import pytest
from peft import LoraConfig

from peft_swift_ext.techniques.unsloth import load_with_unsloth, lora_config_to_unsloth_kwargs


def test_missing_unsloth_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)
    with pytest.raises(ImportError, match=r"peft-swift-ext\[unsloth\]"):
        load_with_unsloth("any/model", LoraConfig(r=2))


def test_lora_config_becomes_unsloth_arguments():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], lora_dropout=0.1, use_rslora=True)
    kwargs = lora_config_to_unsloth_kwargs(config)
    assert kwargs["r"] == 4 and kwargs["lora_alpha"] == 8 and kwargs["lora_dropout"] == 0.1
    assert kwargs["target_modules"] == ["q_proj", "v_proj"] and kwargs["use_rslora"] is True


def test_dora_is_refused_before_loading():
    with pytest.raises(ValueError, match="DoRA"):
        load_with_unsloth("any/model", LoraConfig(r=2, use_dora=True))
