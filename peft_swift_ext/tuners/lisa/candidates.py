"""The parameters LISA switches on and off: each decoder layer's, the input embeddings' and the output head's."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...core.decoder_layers import find_decoder_layers
from ...core.paths import adapter_parameter_ids
from ...core.unwrap import get_input_embeddings, get_output_embeddings
from .config import LisaConfig


@dataclass
class LisaCandidates:
    """The parameters LISA switches: per decoder layer, and those of the input embeddings and output head.

    Args:
        layer_params: one list per decoder layer, in layer order.
        embedding_params: parameters of the input embeddings not inside a decoder layer.
        head_params: parameters of the output head not inside a decoder layer (the embeddings' own when tied).
    """

    layer_params: list[list[nn.Parameter]]
    embedding_params: list[nn.Parameter] = field(default_factory=list)
    head_params: list[nn.Parameter] = field(default_factory=list)


def lisa_candidates(
    model: nn.Module,
    config: LisaConfig,
    layers: nn.ModuleList | None = None,
    only_trainable: bool = False,
    base_only: bool = False,
) -> LisaCandidates:
    """Collect the parameters LISA switches in a plain model: decoder layers, embeddings, head.

    Args:
        model: a plain model (see `unwrap_model`).
        config: the LISA options (`layers_path`, `train_embeddings`, `train_head`).
        layers: the decoder layers, when already found.
        only_trainable: keep only parameters that have `requires_grad` now (so LISA on top of PEFT adapters samples
            which layers' adapters train).
        base_only: leave out the weights of other tuners' adapters (LISA as a tuner trains base weights only).
    """
    if layers is None:
        layers = find_decoder_layers(model, config.layers_path, field="LisaConfig.layers_path")[1]

    excluded = adapter_parameter_ids(model) if base_only else set()

    def keep(params):
        return [p for p in params if (p.requires_grad or not only_trainable) and id(p) not in excluded]

    layer_params = [keep(layer.parameters()) for layer in layers]
    in_layers = {id(p) for p in layers.parameters()}
    embeddings = get_input_embeddings(model)
    head = get_output_embeddings(model)
    embedding_params = [p for p in keep(embeddings.parameters() if embeddings else []) if id(p) not in in_layers]
    head_params = [p for p in keep(head.parameters() if head else []) if id(p) not in in_layers]
    return LisaCandidates(layer_params, embedding_params, head_params)
