"""Toy models for the generic checks: small, seeded, and built from the module types the tuners target.

Each model takes one keyword input and returns one tensor, so every check can treat them alike. A tiny Llama
(``tests/tiny_models.py``) stands in where a tuner needs a decoder (LLaMA-PRO, LongLoRA, LISA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``(batch, 10)`` features -> log-probabilities of 2 classes, through three hidden layers of width 16."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.lin1 = nn.Linear(16, 16)
        self.lin2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = F.relu(self.lin0(X))
        X = F.relu(self.lin1(X))
        X = F.relu(self.lin2(X))
        return F.log_softmax(self.head(X), dim=-1)


class ConvNet(nn.Module):
    """``(batch, 3, 16, 16)`` images -> log-probabilities of 2 classes: two 3x3 convolutions, pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv1(F.relu(self.conv0(pixels))))
        return F.log_softmax(self.head(features.mean(dim=(2, 3))), dim=-1)


class ResidualBlock(nn.Module):
    """``x + lin1(relu(lin0(x)))`` on the last dimension."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin0 = nn.Linear(width, width)
        self.lin1 = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.lin1(F.relu(self.lin0(hidden)))


class ResidualStack(nn.Module):
    """``(batch, tokens, 10)`` -> ``(batch, 2)``: an input projection, three residual blocks, a norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.blocks = nn.ModuleList(ResidualBlock(16) for _ in range(3))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(X)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden).mean(dim=1))


class MixerLayer(nn.Module):
    """A token-mixing layer: each position sees its own features and the mean over all positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.own = nn.Linear(width, width)
        self.pooled = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)
        return hidden + torch.tanh(self.own(x) + self.pooled(x.mean(dim=1, keepdim=True)))


class TokenMixer(nn.Module):
    """``(batch, sequence)`` token ids -> ``(batch, sequence, 2)`` scores: an embedding and two mixing layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(MixerLayer(16) for _ in range(2))
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def seeded(model_cls: type[nn.Module], seed: int = 0):
    """A factory that builds ``model_cls`` with the same weights on every call, in eval mode."""

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return model_cls().eval()

    make.__name__ = f"seeded_{model_cls.__name__}"
    return make


def features_input(batch: int = 6) -> dict:
    """Inputs of :class:`MLP`."""
    return {"X": torch.randn(batch, 10, generator=torch.Generator().manual_seed(1))}


def tokens_features_input(batch: int = 4, tokens: int = 5) -> dict:
    """Inputs of :class:`ResidualStack`."""
    return {"X": torch.randn(batch, tokens, 10, generator=torch.Generator().manual_seed(1))}


def image_input(batch: int = 4) -> dict:
    """Inputs of :class:`ConvNet`."""
    return {"pixels": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def token_input(batch: int = 3, length: int = 7) -> dict:
    """Inputs of :class:`TokenMixer`."""
    return {"input_ids": torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(1))}
