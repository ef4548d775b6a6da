"""The plain U-Net baseline of the paper's Table 1, as in the reference code's ``UNet``.

Encoder: five levels of two 3x3 conv + ReLU + BN (16, 32, 64, 128, 256 channels) with max pooling, dropout
0.5 on the deepest map; decoder: four up blocks without dropout; head: a 1x1 convolution. Trained from
scratch (there are no pretrained weights for it). Inputs must be divisible by 16.
"""

from __future__ import annotations

from nucleiseg.models.base import SegmentationModel
from nucleiseg.models.decoders import SegmentationHead, UNetDecoder
from nucleiseg.models.encoders import ConvEncoder


def unet(num_classes: int = 5, in_channels: int = 3, dropout: float = 0.0) -> SegmentationModel:
    """Build the plain U-Net; ``dropout`` is the decoder's (0 in the reference)."""
    enc = ConvEncoder(in_channels)
    decoder = UNetDecoder(enc.channels, enc.reductions, dropout=dropout)
    head = SegmentationHead(decoder.out_channels, num_classes, reduction=decoder.out_reduction)
    return SegmentationModel(enc, decoder, head, name="unet", num_classes=num_classes)
