"""What the suite measures: one row per tuner, and the scaling sweeps. Plain data, no torch."""

from __future__ import annotations

from . import models

# name, family, mergeable (merged inference is measured), also in ms-swift, note
TUNERS = [
    ("lora", "llama", True, True, "r=8 on q_proj, v_proj"),
    ("loraplus", "llama", True, True, "LoRA+ (same layers as LoRA; only the optimizer groups differ)"),
    ("dora", "llama", True, True, "r=8 on q_proj, v_proj"),
    ("adalora", "llama", True, False, "init_r=8 → target_r=4"),
    ("fourierft", "llama", True, False, "n_frequency = 4×width"),
    ("longlora", "llama", True, True, "ms-swift without S²-attention (its patch fails on transformers 5)"),
    ("llamapro", "llama", True, True, "2 new blocks; merged keeps them, so it is deeper than the base"),
    ("neftune", "llama", False, True, "no weights: backward through activations only; ms-swift's base frozen too"),
    ("adapter", "llama", False, True, "on every MLP"),
    ("prompt", "bert", False, True, "deep prompt, 8 tokens"),
    ("side", "bert", False, True, "mlp side network on the encoder"),
    ("restuning", "vit", False, True, "res_adapter bypass into the final norm"),
    ("scedit", "unet", False, True, "decoder mode on every up-block resnet"),
]
SCALING_TUNERS = [("lora", "llama"), ("adapter", "llama"), ("restuning", "vit")]


def sizes(quick: bool) -> dict:
    return models.QUICK if quick else models.FULL


def scaling_points(family: str, quick: bool) -> dict[str, list[tuple[float, dict]]]:
    """Axis -> [(x value, model size)]: sequence length (patch tokens for ViT) and width, the rest fixed."""
    base = dict(sizes(quick)[family])
    if not quick:
        base["layers"] = 4  # the sweep's largest points would otherwise dominate the run time
    widths = [16, 32, 64] if quick else [128, 256, 512]
    if family == "vit":
        images = [8, 16, 24] if quick else [32, 64, 96, 128]
        seq = [((img // base["patch"]) ** 2 + 1, {**base, "image": img}) for img in images]
    else:
        lengths = [8, 16, 32] if quick else [64, 128, 256, 512]
        seq = [(n, {**base, "seq": n}) for n in lengths]
    return {"sequence": seq, "width": [(w, {**base, "hidden": w}) for w in widths]}
