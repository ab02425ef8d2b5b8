"""Finding the plain model inside PEFT and SWIFT wrappers."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain model wrapped by `PeftModel`, a PEFT tuner or `SwiftModel`.

    Args:
        model: a transformers/diffusers model, or any chain of wrappers around one.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import PreTrainedModel

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        # transformers' own `base_model` is the headless backbone, not a wrapper: stop here.
        if isinstance(model, PreTrainedModel):
            return model
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        elif isinstance(getattr(model, "base_model", None), nn.Module):
            model = model.base_model
        else:
            return model
    return model


def get_input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embeddings of a transformers model; None for models without that method."""
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None


def get_output_embeddings(model: nn.Module) -> nn.Module | None:
    """The output head of a transformers model; None for models without that method."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
