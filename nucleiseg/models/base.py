"""The segmentation model container: encoder, decoder and head, swappable, plus what they were built with.

A :class:`SegmentationModel` maps an image batch ``(N, 3, H, W)`` to class logits ``(N, C, H, W)``; ``H`` and
``W`` must be divisible by ``divisor`` (the encoder's total stride, 32 for ResNets). Its ``info`` dict
records the architecture and where the encoder's weights came from (``encoder_pretrained`` is true only
when pretrained tensors were really loaded), ready to be logged as run parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nucleiseg.weights import WeightsInfo


class SegmentationModel(nn.Module):
    """``head(decoder(encoder(x)))``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, *, name: str, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.name = name
        self.num_classes = num_classes
        self.divisor: int = int(max(encoder.reductions))

    @property
    def weights_info(self) -> WeightsInfo:
        return self.encoder.weights_info

    @property
    def encoder_pretrained(self) -> bool:
        return self.weights_info.pretrained

    @property
    def info(self) -> dict[str, Any]:
        return model_info(
            self.name,
            self.encoder.name,
            self.weights_info,
            self.num_classes,
            self.divisor,
            self.encoder.mean,
            self.encoder.std,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.divisor)
        return self.head(self.decoder(self.encoder(x)))


def check_input_size(x: torch.Tensor, divisor: int) -> None:
    if x.ndim != 4 or x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected (N, C, H, W) with H and W divisible by {divisor}")


def model_info(
    name: str,
    encoder: str,
    weights: WeightsInfo,
    num_classes: int,
    divisor: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, Any]:
    return {
        "model": name,
        "encoder": encoder,
        "encoder_weights": weights.requested,
        "encoder_pretrained": weights.pretrained,
        "encoder_weights_source": weights.source,
        "num_classes": num_classes,
        "input_divisor": divisor,
        "input_mean": list(mean),
        "input_std": list(std),
    }
