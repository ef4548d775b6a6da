"""Encoders: modules mapping an image to a list of feature maps, shallow to deep.

Every encoder exposes ``channels`` (channels of each feature map) and ``reductions`` (its stride with
respect to the input), which is all a decoder needs to know, so encoders and decoders combine freely.

- :class:`TimmEncoder`: any timm backbone with ``features_only=True`` (ResNet34 in the paper; resnet18,
  efficientnet_b0, ... work unchanged), weights resolved by :mod:`nucleiseg.weights`.
- :class:`ConvEncoder`: the plain U-Net encoder of the reference code (two 3x3 convs per level, max
  pooling, 16-32-64-128-256 channels, dropout 0.5 on the deepest map), trained from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nucleiseg.weights import WeightsInfo, create_timm_model


class ConvNormAct(nn.Sequential):
    """3x3 convolution, ReLU, BatchNorm, optional Dropout2d.

    The order (activation before normalisation) is the reference code's ``dilated_conv``; it is kept so
    that the architectures match the paper's models."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_channels),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class TimmEncoder(nn.Module):
    """A timm backbone returning its feature pyramid (strides typically 2, 4, 8, 16, 32)."""

    def __init__(self, name: str = "resnet34", weights: str = "imagenet", in_channels: int = 3) -> None:
        super().__init__()
        self.model, self.weights_info = create_timm_model(name, weights, features_only=True, in_chans=in_channels)
        self.name = name
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        # the normalisation the pretrained weights expect, for the data pipeline
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


class ConvEncoder(nn.Module):
    """The reference code's plain U-Net encoder: levels of two :class:`ConvNormAct` with 2x2 max pooling
    between them; features at strides 1, 2, 4, ..., dropout on the deepest map."""

    def __init__(
        self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128, 256), bottleneck_dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.reductions = [2**i for i in range(len(self.channels))]
        self.levels = nn.ModuleList()
        previous = in_channels
        for out in self.channels:
            self.levels.append(nn.Sequential(ConvNormAct(previous, out), ConvNormAct(out, out)))
            previous = out
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_dropout = nn.Dropout(bottleneck_dropout) if bottleneck_dropout > 0 else nn.Identity()
        self.weights_info = WeightsInfo("none", False, "random init (trained from scratch)")
        self.name = "unet-conv"
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, level in enumerate(self.levels):
            if i:
                x = self.pool(x)
            x = level(x)
            features.append(x)
        features[-1] = self.bottleneck_dropout(features[-1])
        return features
