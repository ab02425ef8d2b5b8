"""Small utilities shared by the tests."""

from __future__ import annotations

import hashlib

import torch
from peft import PeftModel
from torch import nn

from peft_swift_ext import SwiftModel
from peft_swift_ext.core.contract import InPlaceTuner
from peft_swift_ext.core.keys import Slot, adapter_tensors


def base_of(model: nn.Module) -> nn.Module:
    """The model that holds the tuner layers: inside a PeftModel, a SwiftModel, or the model itself."""
    if isinstance(model, PeftModel):  # a SwiftModel is one too
        return model.get_base_model()
    return model


def in_place_tuner(model: nn.Module, adapter_name: str) -> InPlaceTuner | None:
    """The tuner of ``adapter_name`` if it trains base weights in place (LISA), inside a PeftModel or SwiftModel."""
    if isinstance(model, SwiftModel):
        return model.in_place_tuner(adapter_name)
    if isinstance(model, PeftModel) and isinstance(model.base_model, InPlaceTuner):
        return model.base_model
    return None


def adapter_slots(model: nn.Module, adapter_name: str) -> dict[Slot, tuple[str, torch.Tensor]]:
    """Every tensor an adapter's checkpoint holds; for an in-place tuner, the base tensors it saves."""
    if isinstance(model, SwiftModel):
        return model.adapter_slots(adapter_name)
    tuner = in_place_tuner(model, adapter_name)
    if tuner is not None:
        return {Slot(path, "", "", named=False): (path, t) for path, t in tuner.saved_tensors().items()}
    return adapter_tensors(base_of(model), adapter_name)


def adapter_parameter_ids(model: nn.Module, adapter_name: str) -> set[int]:
    """Ids of the tensors that belong to an adapter: its own, or for an in-place tuner every base tensor it trains."""
    tuner = in_place_tuner(model, adapter_name)
    ids = {id(t) for _, t in adapter_slots(model, adapter_name).values()}
    if tuner is not None:
        ids |= {id(p) for p in tuner.trainable_parameters(all_candidates=True)}
    return ids


def randomize_adapter(model: nn.Module, adapter_name: str, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every floating weight of an adapter, so zero-initialised tuners stop being identity.

    For an in-place tuner (LISA) that is the base tensors its checkpoint carries, so the base model itself changes.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot, (_, tensor) in adapter_slots(model, adapter_name).items():
            # only the weights a checkpoint holds; bookkeeping tensors (AdaLoRA's ranknum) stay as built
            if slot.required and tensor.is_floating_point() and tensor.device.type != "meta":
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * scale
                tensor.add_(noise.to(tensor.dtype))


def state_hash(model: nn.Module) -> str:
    """A digest of every key, shape, dtype and value of a model's state dict."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run(model: nn.Module, inputs: dict, pick) -> torch.Tensor:
    """One forward without gradients, returning the compared tensor in float32."""
    with torch.no_grad():
        return pick(model(**inputs)).float()
