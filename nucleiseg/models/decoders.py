"""Decoders and heads: feature pyramid in, full-resolution class logits out.

:class:`UNetDecoder` is the reference code's decoder, generalised to any encoder through its
``channels``/``reductions``: from the deepest map upwards, each :class:`UpBlock` upsamples with a
transposed convolution to half the channels, concatenates the skip map of the next shallower level, and
applies two 3x3 :class:`~nucleiseg.models.encoders.ConvNormAct` with the skip's channel count as output.
For ResNet34 (channels 64, 64, 128, 256, 512) this is exactly ``ResUNet34``'s ``u5``..``u8``.
:class:`SegmentationHead` then maps to the classes at input resolution: a transposed convolution by the
shallowest map's stride (2 for ResNets, as in the reference), or a 1x1 convolution when that stride is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nucleiseg.models.encoders import ConvNormAct


class UpBlock(nn.Module):
    """Upsample ``x`` by ``scale`` (transposed conv, ``in_channels // 2`` channels), concatenate ``skip``,
    two 3x3 conv blocks to ``out_channels``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int = 2, dropout: float = 0.0):
        super().__init__()
        up_channels = max(in_channels // 2, 1)
        self.up = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=scale, stride=scale)
        self.conv1 = ConvNormAct(up_channels + skip_channels, out_channels, dropout)
        self.conv2 = ConvNormAct(out_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:
            raise ValueError(
                f"decoder size mismatch {tuple(x.shape[-2:])} vs skip {tuple(skip.shape[-2:])}: "
                "the input height and width must be divisible by the encoder's total stride"
            )
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """U-Net decoder over an encoder's pyramid; ``out_channels`` is the channel count of its output."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_reductions: Sequence[int],
        dropout: float = 0.1,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(encoder_channels) != len(encoder_reductions) or len(encoder_channels) < 2:
            raise ValueError("an encoder must give at least two feature maps, with one stride each")
        # output channels per block, deepest first; by default each block outputs its skip's channels
        skips = list(encoder_channels[:-1])[::-1]
        outs = list(decoder_channels) if decoder_channels is not None else skips
        if len(outs) != len(skips):
            raise ValueError(f"decoder_channels needs {len(skips)} entries, got {len(outs)}")
        reductions = list(encoder_reductions)
        self.blocks = nn.ModuleList()
        previous = encoder_channels[-1]
        for i, (skip, out) in enumerate(zip(skips, outs, strict=True)):
            deep, shallow = reductions[-1 - i], reductions[-2 - i]
            if deep % shallow:
                raise ValueError(f"encoder strides {reductions} are not successive multiples")
            self.blocks.append(UpBlock(previous, skip, out, scale=deep // shallow, dropout=dropout))
            previous = out
        self.out_channels = previous
        self.out_reduction = reductions[0]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1]), strict=True):
            x = block(x, skip)
        return x


class SegmentationHead(nn.Module):
    """Class logits at input resolution from a decoder output at stride ``reduction``."""

    def __init__(self, in_channels: int, num_classes: int, reduction: int = 2) -> None:
        super().__init__()
        if reduction > 1:
            self.proj: nn.Module = nn.ConvTranspose2d(in_channels, num_classes, kernel_size=reduction, stride=reduction)
        else:
            self.proj = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
