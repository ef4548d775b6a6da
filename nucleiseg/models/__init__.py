"""Segmentation models by name: ``resunet34`` (the paper's model) and the Table 1 baselines ``unet``, ``fcn8s``.

:func:`create_model` builds one; the result is a :class:`SegmentationModel` mapping ``(N, 3, H, W)`` images
to ``(N, num_classes, H, W)`` logits, whose ``info`` dict (``encoder_pretrained``, ``encoder_weights_source``,
the input normalisation ...) is meant to be logged with the run.
"""

from __future__ import annotations

from collections.abc import Callable

from nucleiseg.models.base import SegmentationModel
from nucleiseg.models.decoders import SegmentationHead, UNetDecoder, UpBlock
from nucleiseg.models.encoders import ConvEncoder, TimmEncoder
from nucleiseg.models.fcn import FCN8sDecoder, VGG16Encoder, fcn8s
from nucleiseg.models.resunet import resunet
from nucleiseg.models.unet import unet
from nucleiseg.weights import PretrainedWeightsWarning, WeightsError, WeightsInfo

__all__ = [
    "ConvEncoder",
    "FCN8sDecoder",
    "PretrainedWeightsWarning",
    "SegmentationHead",
    "SegmentationModel",
    "TimmEncoder",
    "UNetDecoder",
    "UpBlock",
    "VGG16Encoder",
    "WeightsError",
    "WeightsInfo",
    "available_models",
    "create_model",
]


def _resunet34(encoder: str, encoder_weights: str, num_classes: int, dropout: float) -> SegmentationModel:
    return resunet(encoder, encoder_weights, num_classes, dropout, name="resunet34")


def _unet(encoder: str, encoder_weights: str, num_classes: int, dropout: float) -> SegmentationModel:
    return unet(num_classes)  # trained from scratch, no decoder dropout: the reference's UNet


def _fcn8s(encoder: str, encoder_weights: str, num_classes: int, dropout: float) -> SegmentationModel:
    return fcn8s(encoder_weights, num_classes)  # the backbone is always VGG16


_MODELS: dict[str, Callable[[str, str, int, float], SegmentationModel]] = {
    "resunet34": _resunet34,
    "unet": _unet,
    "fcn8s": _fcn8s,
}


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    encoder: str = "resnet34",
    encoder_weights: str = "imagenet",
    num_classes: int = 5,
    dropout: float = 0.1,
) -> SegmentationModel:
    """Build the model ``name``.

    ``encoder`` (any timm backbone name) and ``dropout`` (decoder Dropout2d) apply to ``resunet34``;
    ``encoder_weights`` (``imagenet`` | ``none`` | a checkpoint path) to ``resunet34`` and to ``fcn8s``'s
    VGG16. ``unet`` is always trained from scratch. Unreachable ImageNet weights give random init, one
    :class:`PretrainedWeightsWarning` and ``model.encoder_pretrained == False``.
    """
    try:
        build = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return build(encoder, encoder_weights, num_classes, dropout)
