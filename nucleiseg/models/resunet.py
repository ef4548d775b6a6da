"""ResUNet34 (Qu et al. 2019): a U-Net whose encoder is an ImageNet-pretrained timm backbone.

With the default ResNet34 this is the reference code's ``ResUNet34``: the encoder's five maps (strides
2-32, channels 64, 64, 128, 256, 512), four up blocks (transposed conv x2, concatenated skip, two 3x3
conv + ReLU + BN, Dropout2d 0.1) and a final transposed convolution to the class maps at input resolution.
Any timm backbone with ``features_only`` support can replace ResNet34 (``encoder="resnet18"``,
``"efficientnet_b0"``, ``"resnet34.tv_in1k"`` for the torchvision weights the reference used).
"""

from __future__ import annotations

from nucleiseg.models.base import SegmentationModel
from nucleiseg.models.decoders import SegmentationHead, UNetDecoder
from nucleiseg.models.encoders import TimmEncoder


def resunet(
    encoder: str = "resnet34",
    encoder_weights: str = "imagenet",
    num_classes: int = 5,
    dropout: float = 0.1,
    name: str = "resunet34",
) -> SegmentationModel:
    """Build the timm-encoder U-Net."""
    enc = TimmEncoder(encoder, encoder_weights)
    decoder = UNetDecoder(enc.channels, enc.reductions, dropout=dropout)
    head = SegmentationHead(decoder.out_channels, num_classes, reduction=decoder.out_reduction)
    return SegmentationModel(enc, decoder, head, name=name, num_classes=num_classes)
