"""Each tuner's maths written out from its documented formula, as forward hooks on a model that lacks it.

A reference puts one adapter's maths on the module that answers at the adapter's target path: the outermost
tuner layer there, if other adapters wrap that module. That is what a later adapter's layer does (its output is
computed from theirs), so "inner adapter alone + these hooks" is the hand-computed composition. The weights are
the adapter's own, as ``SwiftModel.adapter_state_dict`` gives them (SWIFT-layout keys). Nothing here runs a tuner
layer: every formula is spelt out from the tuner's page in ``docs/tuners`` (PEFT's LoRA and DoRA from PEFT's).

Each ``install`` function returns the hook handles; remove them to get the model back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

Weights = dict[str, torch.Tensor]
Install = Callable[[nn.Module, Weights, str], list[RemovableHandle]]


# --- where a path is, through tuner layers (written here, not taken from the package under test) -------------


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module the model calls at ``path`` (a path without ``base_layer`` segments): the outermost tuner layer
    wrapping the module there, if any."""
    module = model
    for part in path.split(".") if path else ():
        while part not in module._modules and isinstance(module, BaseTunerLayer):
            module = module.base_layer
        module = module._modules[part]
    return module


def canonical_path(path: str) -> str:
    """``path`` without the ``base_layer`` segments tuner layers add."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


# --- reading and writing a module's output -------------------------------------------------------------------


def _get(output, position):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output[position] if isinstance(position, str) else list(output.values())[position]
    return output[position]


def _put(output, position, value):
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, Mapping):
        key = position if isinstance(position, str) else list(output.keys())[position]
        output[key] = value
        return output
    items = list(output)
    items[position] = value
    return type(output)(items)


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


def _with_argument(args: tuple, kwargs: dict, index: int, name: str, value) -> tuple[tuple, dict]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def _entry(weights: Weights, prefix: str) -> Weights:
    """The tensors under ``prefix`` (with it removed); an error if there are none, so a wrong path cannot pass."""
    found = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
    if not found:
        raise KeyError(f"no adapter tensor under {prefix!r}; keys: {sorted(weights)[:6]}...")
    return found


def _mlp(x: torch.Tensor, first_w, first_b, second_w, second_b) -> torch.Tensor:
    """``W2 GELU(W1 x + b1) + b2`` over the last dimension (exact GELU)."""
    return F.linear(F.gelu(F.linear(x, first_w, first_b)), second_w, second_b)


def _over_channels(x: torch.Tensor, transform) -> torch.Tensor:
    """``transform`` applied per token: on the last dimension, or per pixel on the channels of a 4-D map."""
    if x.dim() != 4:
        return transform(x)
    tokens = x.flatten(2).transpose(1, 2)
    return transform(tokens).transpose(1, 2).reshape(x.shape)


# --- this package's tuners ------------------------------------------------------------------------------------


def adapter(targets: list[str], hidden_pos=0, hooked: Callable[[str], str] = lambda path: path) -> Install:
    """Adapter: ``h -> h + W2 act(W1 h + b1) + b2`` on element ``hidden_pos`` of the target's output (GELU).

    Args:
        targets: the adapter's target paths.
        hidden_pos: the output element it transforms.
        hooked: the module whose output the adapted method returns (BERT's ``feed_forward_chunk`` returns its
            ``output`` sub-module's output, so a method adapter is hooked there).
    """

    def install(model, weights, name):
        handles = []
        for path in targets:
            down = _entry(weights, f"{path}.adapter_down.{name}.")
            up = _entry(weights, f"{path}.adapter_up.{name}.")

            def hook(module, args, output, down=down, up=up):
                h = _get(output, hidden_pos)
                return _put(output, hidden_pos, h + _mlp(h, down["weight"], down["bias"], up["weight"], up["bias"]))

            handles.append(module_at(model, hooked(path)).register_forward_hook(hook))
        return handles

    return install


def side(targets: list[str], source_pos: int = 0, target_pos=0) -> Install:
    """Side (mlp side net): ``σ(α)·main + (1-σ(α))·fc2(GELU(fc1(x)))``, ``x`` the target's input ``source_pos``."""

    def install(model, weights, name):
        handles = []
        for path in targets:
            net = _entry(weights, f"{path}.side_net.{name}.")
            alpha = weights[f"{path}.side_alpha.{name}"]

            def hook(module, args, kwargs, output, net=net, alpha=alpha):
                source = args[source_pos]
                side_out = _mlp(source, net["fc1.weight"], net["fc1.bias"], net["fc2.weight"], net["fc2.bias"])
                gate = torch.sigmoid(alpha)
                return _put(output, target_pos, gate * _get(output, target_pos) + (1 - gate) * side_out)

            handles.append(module_at(model, path).register_forward_hook(hook, with_kwargs=True))
        return handles

    return install


def scedit(targets: list[str], dims: list[int], mode: str) -> Install:
    """SCEdit: ``T(x) = W2 GELU(W1 x + c1) + c2`` per pixel; decoder: input ``[h, s] -> [h, s + T(s)]`` (s the
    last ``dim`` channels); encoder / identity: output ``o -> o + T(o)``."""

    def install(model, weights, name):
        handles = []
        for path, dim in zip(targets, dims):
            first = _entry(weights, f"{path}.scedit_ln1.{name}.")
            second = _entry(weights, f"{path}.scedit_ln2.{name}.")

            def tuned(x, first=first, second=second):
                return x + _over_channels(
                    x, lambda t: _mlp(t, first["weight"], first["bias"], second["weight"], second["bias"])
                )

            module = module_at(model, path)
            if mode == "decoder":

                def pre(module, args, kwargs, dim=dim, tuned=tuned):
                    x = _argument(args, kwargs, 0, "input_tensor")
                    hidden, skip = x[:, : x.shape[1] - dim], x[:, x.shape[1] - dim :]
                    return _with_argument(args, kwargs, 0, "input_tensor", torch.cat([hidden, tuned(skip)], 1))

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def hook(module, args, output, tuned=tuned):
                    return _put(output, 0, tuned(_get(output, 0)))

                handles.append(module.register_forward_hook(hook))
        return handles

    return install


def restuning(root: str, stems: list[str], target: str, hook: str = "input") -> Install:
    """Res-Tuning with ``res_adapter`` blocks: ``b_0`` = the root's input, ``b_{i+1} = R_lat_i(s_i) + R_vert_i(b_i)``
    with ``R(x) = x + W2 GELU(W1 x + c1) + c2`` and ``s_i`` stem ``i``'s output; the target's input (or output,
    with ``hook="output"``) becomes ``b``.

    Features are what the model gets from the root and stems (their outermost layers); a stem that is the target
    itself gives its output before it is replaced (its capture hook runs first).
    """

    def install(model, weights, name):
        features: dict = {}
        handles = [
            module_at(model, root).register_forward_pre_hook(lambda m, args: features.__setitem__("root", args[0]))
        ]
        for index, stem in enumerate(stems):
            handles.append(
                module_at(model, stem).register_forward_hook(
                    lambda m, a, out, index=index: features.__setitem__(index, _get(out, 0))
                )
            )
        prefix = f"{target}.restuning_bypass.{name}.blocks."

        def res_adapter(x, block, side):
            p = _entry(weights, f"{prefix}{block}.{side}.")
            return x + _mlp(x, p["ln1.weight"], p["ln1.bias"], p["ln2.weight"], p["ln2.bias"])

        def bypass():
            value = features["root"]
            for index in range(len(stems)):
                value = res_adapter(features[index], index, "lateral") + res_adapter(value, index, "vertical")
            return value

        module = module_at(model, target)
        if hook == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args: (bypass(), *args[1:])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out: _put(out, 0, bypass())))
        return handles

    return install


def prompt(layers: list[str], length: int, extract: bool, rotary: bool = False) -> Install:
    """Deep prompts: layer 0 gets ``[P_0; x]``, layer ``i`` gets ``[P_i; h[L:]]``; the last drops the ``L`` prompt
    positions from its output with ``extract``; rotary ``(cos, sin)`` tables get copies of their first row.

    Only calls without an attention mask are modelled (the composition tests pass none): a mask fails loudly.
    """

    def install(model, weights, name):
        handles = []
        for index, path in enumerate(layers):
            tokens = weights[f"{path}.prompt_token.{name}"]
            assert tokens.shape[1] == length

            def pre(module, args, kwargs, tokens=tokens, first=index == 0):
                x = _argument(args, kwargs, 0, "hidden_states")
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                assert mask is None, "the reference models prompts on unmasked calls only"
                p = tokens.expand(x.shape[0], -1, -1)
                x = torch.cat((p, x if first else x[:, length:]), 1)
                args, kwargs = _with_argument(args, kwargs, 0, "hidden_states", x)
                if rotary:
                    cos, sin = kwargs["position_embeddings"]
                    kwargs["position_embeddings"] = tuple(
                        torch.cat((t[..., :1, :].expand(*t.shape[:-2], x.shape[1] - t.shape[-2], t.shape[-1]), t), -2)
                        for t in (cos, sin)
                    )
                return args, kwargs

            module = module_at(model, path)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if extract and index == len(layers) - 1:
                handles.append(module.register_forward_hook(lambda m, a, out: _put(out, 0, _get(out, 0)[:, length:])))
        return handles

    return install


def llamapro(layer: str, blocks: int, make_block: Callable[[nn.Module, int], nn.Module]) -> Install:
    """LLaMA-PRO: after decoder layer ``layer``, ``blocks`` new decoder layers run on its output with the same
    masks and rotary tables; each is a plain decoder layer holding the adapter's block weights.

    Args:
        layer: the group's last layer.
        blocks: how many blocks follow it.
        make_block: builds an empty decoder layer for the model (model, index).
    """

    def install(model, weights, name):
        modules = []
        for index in range(blocks):
            block = make_block(model, index).eval()
            block.load_state_dict(_entry(weights, f"{layer}.llamapro_blocks.{name}.{index}."), strict=True)
            modules.append(block)

        def hook(module, args, kwargs, output):
            for block in modules:
                output = block(output, *args[1:], **kwargs)
            return output

        return [module_at(model, layer).register_forward_hook(hook, with_kwargs=True)]

    return install


def neftune(target: str, alpha: float) -> Install:
    """NEFTune (training only): ``e + U(-m, m)`` with ``m = alpha / sqrt(L·d)``, drawn with ``uniform_`` from the
    global generator (so a seeded forward draws the same noise)."""

    def install(model, weights, name):
        def hook(module, args, output):
            if not module.training:
                return output
            m = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
            return output + torch.empty_like(output).uniform_(-m, m)

        return [module_at(model, target).register_forward_hook(hook)]

    return install


# --- PEFT's LoRA and DoRA ---------------------------------------------------------------------------------------


def lora(targets: list[str], scaling: float, keep_modules: bool = False) -> Install:
    """LoRA: ``y + s·B A x`` (an embedding: ``y + s·B^T A^T[ids]``).

    Args:
        targets: the adapter's target paths.
        scaling: ``lora_alpha / r``.
        keep_modules: the checkpoint also holds trained copies of whole modules (LongLoRA's embeddings and
            norms, PEFT's ``modules_to_save``): they replace the model's own weights.
    """

    def install(model, weights, name):
        handles = []
        for path in targets:
            if f"{path}.lora_embedding_A.{name}" in weights:
                a, b = weights[f"{path}.lora_embedding_A.{name}"], weights[f"{path}.lora_embedding_B.{name}"]

                def hook(module, args, output, a=a, b=b):
                    return output + F.embedding(args[0], a.T) @ b.T * scaling
            else:
                a, b = weights[f"{path}.lora_A.{name}.weight"], weights[f"{path}.lora_B.{name}.weight"]

                def hook(module, args, output, a=a, b=b):
                    return output + args[0] @ a.T @ b.T * scaling

            handles.append(module_at(model, path).register_forward_hook(hook))
        if keep_modules:
            copies = {key: value for key, value in weights.items() if ".lora_" not in key}
            assert copies, "no module copies in the checkpoint"
            with torch.no_grad():
                for key, param in model.named_parameters():
                    if canonical_path(key) in copies:
                        param.copy_(copies.pop(canonical_path(key)))
            assert not copies, f"module copies without a place in the model: {sorted(copies)}"
        return handles

    return install


def dora(targets: list[str], scaling: float) -> Install:
    """DoRA on the output ``y`` of what it wraps: ``y + (m/‖W + s·BA‖ - 1)·(y - bias) + (m/‖W + s·BA‖)·s·B A x``,
    the norm taken per output row of the base weight ``W`` (PEFT's DoRA treats ``y`` as the base result)."""

    def install(model, weights, name):
        handles = []
        for path in targets:
            a, b = weights[f"{path}.lora_A.{name}.weight"], weights[f"{path}.lora_B.{name}.weight"]
            magnitude = weights[f"{path}.lora_magnitude_vector.{name}.weight"]
            module = module_at(model, path)
            linear = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            scale = magnitude / (linear.weight + scaling * b @ a).norm(dim=1)
            bias = 0 if linear.bias is None else linear.bias

            def hook(module, args, output, a=a, b=b, scale=scale, bias=bias):
                return output + (scale - 1) * (output - bias) + scale * (args[0] @ a.T @ b.T) * scaling

            handles.append(module.register_forward_hook(hook))
        return handles

    return install
