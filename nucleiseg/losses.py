"""Training losses of Qu et al. (2019): pixel-weighted cross-entropy plus a VGG16 perceptual loss on contours.

Definitions, for logits ``z`` of shape ``(N, 5, H, W)`` (classes: background, tumor / lymphocyte / stroma
inside, contour), a target class map ``y`` and a pixel weight map ``w`` (eq. 2, ``1 + w0·exp(...)``):

- eq. 1, :func:`weighted_cross_entropy`: ``L_ce = mean over pixels of w · (-log softmax(z)[y])``. Pixels
  with weight 0 (ignored regions) contribute nothing but still count in the mean, as in the reference code.
- eq. 3, :class:`PerceptualLoss`: the predicted contour probability ``p = softmax(z)[4]`` and the
  ground-truth contour map ``t = [y == 4]`` each go, repeated to 3 channels, through a frozen VGG16;
  ``L_per = 1/4 · sum over l in (relu1_2, relu2_2, relu3_3, relu4_3) of mean((phi_l(p) - phi_l(t))^2)``,
  the mean running over batch, channels and pixels (the reference's ``sum / (N·C·H·W)``).
  As in the reference code the maps enter VGG as probabilities in [0, 1], without ImageNet normalisation.
- :class:`SegmentationLoss`: ``L = L_ce + beta · L_per`` (beta = 0.1); with beta = 0 no VGG is built.

Cost: VGG16 is cut after relu4_3 and frozen (``requires_grad=False``: the backward pass computes input
gradients only); the target's features are computed without an autograd graph; the input is one map
repeated to three channels, so ``conv1_1`` becomes a 1-channel convolution with its weights summed over RGB
(the same function up to float rounding). Everything else is torch's own convolutions (oneDNN on CPUs,
cuDNN on GPUs); ``benchmarks/bench_perceptual.py`` measures the training step's cost against a step without
the loss and checks the equality with the reference formulation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from nucleiseg.weights import WeightsInfo, load_matching, vgg16_state_dict

CONTOUR_CLASS = 4
# indices in torchvision's vgg16().features of the ReLUs whose outputs are compared
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target must be (N, H, W) = {(n, h, w)} to match logits, got {tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (n, h, w):
        raise ValueError(f"weight map must be (N, H, W) = {(n, h, w)} to match logits, got {tuple(weight.shape)}")


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, log_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 1: the mean over all pixels of ``weight · -log softmax(logits)[target]``.

    ``logits`` (N, C, H, W), ``target`` (N, H, W) integer classes, ``weight`` (N, H, W). ``log_probs``
    may pass ``log_softmax(logits, 1)`` when the caller has it already."""
    _check_shapes(logits, target, weight)
    if log_probs is None:
        log_probs = F.log_softmax(logits.float(), dim=1)
    nll = F.nll_loss(log_probs, target.long(), reduction="none")
    return (nll * weight.to(nll.dtype)).mean()


class VGG16Features(nn.Module):
    """Frozen VGG16 convolutions up to relu4_3 for single-channel maps, returning the four compared features.

    ``conv1_1`` takes one channel: its weights are summed over the three RGB inputs, which is the same
    function as feeding the map repeated to three channels (up to float rounding)."""

    def __init__(self, weights: str = "imagenet") -> None:
        super().__init__()
        layers = make_layers(cfgs["D"], batch_norm=False)[: VGG16_LAYERS["relu4_3"] + 1]
        state, self.weights_info = vgg16_state_dict(weights)
        if state is not None:
            load_matching(layers, state, weights)
        first = layers[0]
        folded = nn.Conv2d(1, first.out_channels, kernel_size=3, padding=1)
        with torch.no_grad():
            folded.weight.copy_(first.weight.sum(dim=1, keepdim=True))
            folded.bias.copy_(first.bias)
        layers[0] = folded
        self.layers = layers
        self.taps = frozenset(VGG16_LAYERS.values())
        self.requires_grad_(False)
        self.eval()
        # channels_last: oneDNN's convolutions take NHWC tensors as they are, NCHW ones are reordered to its
        # blocked layout and back on every call.
        # Measured (CPU, one thread, the loss's forward + backward, interleaved): 0.28 vs 0.32 s at 2x128²,
        # 0.82 vs 0.92 s at 2x224². (Not measured on a GPU, where bf16 tensor cores also prefer NHWC.)
        # torch.compile is not used: at 2x128² it saved 0.02 s a call (0.25 vs 0.28 s) for ~30 s of
        # compilation, at 2x224² nothing measurable (1.28 vs 1.28 s), so it would not pay for itself over a
        # demo run (32 steps); it would also bring back a C++ compiler at run time.
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # always eval: a frozen feature extractor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features at relu1_2, relu2_2, relu3_3 and relu4_3 of ``x`` (N, 1, H, W)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"VGG16Features expects single-channel maps (N, 1, H, W), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        features = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                features.append(x)
        return features


class PerceptualLoss(nn.Module):
    """Eq. 3 between a predicted and a ground-truth map, both ``(N, 1, H, W)`` in [0, 1]; differentiable in
    the prediction only (the target's features are computed without a graph)."""

    def __init__(self, weights: str = "imagenet") -> None:
        super().__init__()
        self.vgg = VGG16Features(weights)

    @property
    def weights_info(self) -> WeightsInfo:
        return self.vgg.weights_info

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
            raise ValueError(
                f"pred and target must both be (N, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        pred, target = pred.float(), target.float()
        with torch.no_grad():
            target_features = self.vgg(target)
        terms = [F.mse_loss(a, b) for a, b in zip(self.vgg(pred), target_features, strict=True)]
        return torch.stack(terms).mean()


class SegmentationLoss(nn.Module):
    """``L = L_ce + beta · L_per``; returns ``(total, {"ce": ..., "perceptual": ...})``, the parts detached.

    With ``beta == 0`` the VGG is never built and ``perceptual`` is reported as 0."""

    def __init__(self, beta: float = 0.1, vgg_weights: str = "imagenet") -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.perceptual = PerceptualLoss(vgg_weights) if self.beta > 0 else None

    @property
    def vgg_pretrained(self) -> bool | None:
        """Whether the perceptual loss's VGG16 has ImageNet (or file) weights; None when beta = 0."""
        return None if self.perceptual is None else self.perceptual.weights_info.pretrained

    @property
    def info(self) -> dict[str, Any]:
        """For the run record: whether the VGG really has ImageNet weights and where they came from."""
        if self.perceptual is None:
            return {"beta": self.beta, "vgg_pretrained": False, "vgg_weights_source": "not built (beta = 0)"}
        info = self.perceptual.weights_info
        return {"beta": self.beta, "vgg_pretrained": info.pretrained, "vgg_weights_source": info.source}

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_shapes(logits, target, weight)
        log_probs = F.log_softmax(logits.float(), dim=1)
        ce = weighted_cross_entropy(logits, target, weight, log_probs=log_probs)
        if self.perceptual is None:
            return ce, {"ce": ce.detach(), "perceptual": torch.zeros((), device=ce.device)}
        contour_prob = log_probs[:, CONTOUR_CLASS : CONTOUR_CLASS + 1].exp()  # softmax, reusing log_softmax
        contour_true = (target == CONTOUR_CLASS).unsqueeze(1).to(contour_prob.dtype)
        per = self.perceptual(contour_prob, contour_true)
        return ce + self.beta * per, {"ce": ce.detach(), "perceptual": per.detach()}
