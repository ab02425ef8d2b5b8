"""The side networks of side-tuning, with ms-swift's module names (so its checkpoints load as they are)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class FCN4(nn.Module):
    """Four conv blocks (conv, GroupNorm, ReLU) on an RGB image, average-pooled, then a linear map to ``out_dims``."""

    def __init__(self, out_dims: int) -> None:
        super().__init__()
        self.conv1 = _conv_block(3, 16, stride=1, padding=1)
        self.conv2 = _conv_block(16, 16, stride=2, padding=0)
        self.conv3 = _conv_block(16, 32, stride=2, padding=0)
        self.conv4 = _conv_block(32, 64, stride=1, padding=0)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, out_dims)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.conv4(self.conv3(self.conv2(self.conv1(image))))
        return self.fc(self.pool(features).flatten(1))


def _conv_block(channels_in: int, channels_out: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.GroupNorm(2, channels_out),
        nn.ReLU(),
    )


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with ``dim -> dim -> dim``, as the MLP of a vision transformer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def alexnet(out_dims: int) -> nn.Sequential:
    """AlexNet's convolutional features, pooled to 6×6, flattened, then a linear map to ``out_dims``.

    Randomly initialised: unlike ms-swift nothing is downloaded. Parameter names follow torchvision, so
    pretrained ``features`` can be copied in, and ms-swift checkpoints (which hold them) load directly.
    """
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    return nn.Sequential(
        OrderedDict(
            features=features,
            avgpool=nn.AdaptiveAvgPool2d((6, 6)),
            flatten=nn.Flatten(),
            fc=nn.Linear(256 * 6 * 6, out_dims, bias=False),
        )
    )


SIDE_NETWORKS = {"fcn4": FCN4, "mlp": Mlp, "alexnet": alexnet}
