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

Cost: the perceptual term computes the same numbers as the reference formulation, more cheaply
(measured in ``benchmarks/bench_perceptual.py``, which also checks the equality):

- VGG16 is cut after relu4_3 and frozen (``requires_grad=False``: the backward pass computes input
  gradients only); the target's features are computed without an autograd graph;
- the input is one map repeated to three channels, so ``conv1_1`` becomes a 1-channel convolution with its
  weights summed over RGB;
- on CPUs (:meth:`VGG16Features.cpu_optimized`): channels-last layout; the 3x3 convolutions of blocks 2-4
  by Winograd's F(6x6, 3x3) (F(4x4, 3x3) without a C compiler) with their ReLUs fused
  (:mod:`nucleiseg.models.winograd`: ~5x fewer multiplications, compiled tile transforms, one reused
  scratch workspace); each tap's ReLU, distance and the max-pool after it in one pass each way
  (:mod:`nucleiseg.models.feature_taps`); the binary target's first two convolutions by table look-up
  (:class:`BinaryStem`); the batch two images at a time, each chunk's VGG backward done at once
  (:class:`_ChunkedPerceptual`), which keeps the working set small. ``conv1_2`` (64 channels at full
  resolution) stays direct: by Winograd it was no faster, measured, and rounds more.

Results agree with the direct formulation to float32 rounding (relative 1e-7 on the loss at 2x224x224; the
gradient to ~1e-6, or ~1e-4 where rounding flips a ReLU or a max-pool choice between two near-equal values).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from nucleiseg.models import feature_taps, winograd
from nucleiseg.models.winograd import FrozenWinogradConv2d, WinogradWorkspace
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
        self.fused_taps = False  # see feature_distance; set on the CPU copy
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # always eval: a frozen feature extractor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"VGG16Features expects single-channel maps (N, 1, H, W), got {tuple(x.shape)}")
        return self.run(x)[0]

    def forward_binary(self, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`forward` for maps of zeros and ones, the first two convolutions by table look-up when the
        network has a :class:`BinaryStem` (its CPU copy does); the same features up to float rounding."""
        return self.run(x, binary=True)[0]

    def feature_distance(self, x: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """``1/4 · sum over the taps of mean((phi_l(x) - targets[l])^2)``, differentiable in ``x``."""
        return torch.stack(self.run(x, targets=targets)[0]).mean()

    def run(
        self, x: torch.Tensor, targets: list[torch.Tensor] | None = None, binary: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The layers applied to ``x``: ``(per tap, its features, or with targets its distance term
        mean((features - target)^2); the output)``. ``binary``: ``x`` holds zeros and ones, use the
        :class:`BinaryStem` when there is one.

        With ``fused_taps`` (the CPU copy) and targets, each tap's ReLU, distance and the max-pool after it
        run as one op (:func:`nucleiseg.models.feature_taps.fused_tap`); otherwise layer by layer."""
        layers = list(self.layers)
        out: list[torch.Tensor] = []
        stem = getattr(self, "binary_stem", None) if binary else None
        i = 0
        if stem is not None:
            x, i = stem(x), stem.replaces  # conv1_2 before its ReLU
        while i < len(layers):
            if targets is not None and i in self.taps and self.fused_taps and feature_taps.available(x):
                # the tap's layer is its ReLU (or an Identity after a ReLU fused into the convolution:
                # applying the ReLU once more changes nothing)
                following = layers[i + 1] if i + 1 < len(layers) else None
                pool = isinstance(following, nn.MaxPool2d) and _is_2x2_pool(following)
                term, pooled = feature_taps.fused_tap(x, targets[len(out)], pool)
                out.append(term)
                if pool:
                    x, i = pooled, i + 2
                    continue
            else:
                x = layers[i](x)
                if i in self.taps:
                    out.append(x if targets is None else _SquaredDistance.apply(x, targets[len(out)]))
            i += 1
        return out, x

    def cpu_optimized(self) -> VGG16Features:
        """A copy for CPUs: channels-last weights; the 3x3 convolutions of blocks 2-4 by Winograd F(6x6, 3x3),
        or F(4x4, 3x3) without the compiled transforms, with their ReLUs fused (:mod:`nucleiseg.models.winograd`;
        the fused ReLUs' places hold ``nn.Identity`` so that the taps keep their indices); the taps fused with
        the max-pools after them (:meth:`feature_distance`); the first two convolutions by table look-up for
        binary maps (:class:`BinaryStem`). Block 1 stays direct: at full resolution with 64 channels the
        Winograd transforms cost what they save (measured). The Winograd kernels, forward and backward, take
        14x (F(6x6)) or 8x (F(4x4)) the memory of the weights they replace (~430 or ~250 MB); all layers
        share one scratch workspace (they run one after another)."""
        fast = copy.deepcopy(self).to(memory_format=torch.channels_last)
        workspace = WinogradWorkspace()
        tile = 6 if winograd.compiled_available() else 4
        first_pool = next(i for i, layer in enumerate(fast.layers) if isinstance(layer, nn.MaxPool2d))
        for i, layer in enumerate(fast.layers):
            if isinstance(layer, nn.Conv2d) and i > first_pool:
                fused = isinstance(fast.layers[i + 1], nn.ReLU)
                fast.layers[i] = FrozenWinogradConv2d.from_conv(layer, relu=fused, workspace=workspace, tile=tile)
                if fused:
                    fast.layers[i + 1] = nn.Identity()
        fast.binary_stem = BinaryStem(fast.layers[0], fast.layers[2])
        fast.fused_taps = True
        return fast


class BinaryStem(nn.Module):
    """``conv1_2(relu(conv1_1(t)))`` for a single-channel map ``t`` of zeros and ones, by table look-up.

    ``relu(conv1_1(t))`` at a pixel depends only on the 3x3 binary pattern around it (512 cases), so each of
    the nine taps of ``conv1_2`` adds one of 9 x 512 precomputed vectors: one ``embedding_bag`` sum per pixel
    instead of 64x64x9 multiply-adds. Used for the ground-truth contour map, which is binary."""

    replaces = 3  # conv1_1, its ReLU, conv1_2

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d) -> None:
        super().__init__()
        w1, b1 = conv1.weight.detach().double(), conv1.bias.detach().double()
        w2 = conv2.weight.detach().double()
        bits = (torch.arange(512)[:, None] >> torch.arange(9)) & 1  # pattern p: bit k at (k // 3, k % 3)
        relu1 = torch.relu(bits.double() @ w1.reshape(w1.shape[0], 9).T + b1)  # (512, C1)
        taps = torch.einsum("oiyx,pi->yxpo", w2, relu1).reshape(9, 512, -1)  # each 3x3 tap of conv2
        # one more row per tap, of zeros: conv2's zero padding of relu1 outside the image
        table = torch.cat([taps, taps.new_zeros(9, 1, taps.shape[-1])], dim=1).reshape(9 * 513, -1)
        self.register_buffer("table", table.to(conv1.weight.dtype))
        self.register_buffer("bias", conv2.bias.detach().clone())
        self.register_buffer("powers", (2.0 ** torch.arange(9.0)).reshape(1, 1, 3, 3).to(conv1.weight.dtype))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n, _, h, w = t.shape
        pattern = F.conv2d(t, self.powers, padding=1)  # exact small integers in float
        pattern = F.pad(pattern, (1, 1, 1, 1), value=512).long()[:, 0]  # 512: outside the image
        bags = torch.stack(
            [pattern[:, dy : dy + h, dx : dx + w] + 513 * (3 * dy + dx) for dy in range(3) for dx in range(3)], dim=-1
        )
        out = F.embedding_bag(bags.view(-1, 9), self.table, mode="sum")
        return out.view(n, h, w, -1).permute(0, 3, 1, 2).add_(self.bias.view(1, -1, 1, 1))


class _SquaredDistance(torch.autograd.Function):
    """``mean((a - b)^2)`` for a constant ``b``, keeping only ``a - b`` for the backward pass (one fused pass
    each way instead of the several temporaries of ``mse_loss``)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b
        ctx.save_for_backward(diff)
        # square().sum(): torch's cascade summation; vector_norm's float32 accumulation drifts by ~1e-4 here
        return diff.square().sum() / diff.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (diff,) = ctx.saved_tensors
        return diff * (grad * (2.0 / diff.numel())), None


def _perceptual_terms(net: nn.Module, pred: torch.Tensor, target: torch.Tensor, binary: bool) -> torch.Tensor:
    """``(1/4) sum_l mean((phi_l(pred) - phi_l(target))^2)``; the target's features without a graph."""
    with torch.no_grad():
        target_features = net.forward_binary(target) if binary else net(target)
    return net.feature_distance(pred, target_features)


def _is_2x2_pool(pool: nn.MaxPool2d) -> bool:
    return (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) in (
        (2, 2, 0, 1, False),
        ((2, 2), (2, 2), (0, 0), (1, 1), False),
    )


class _ChunkedPerceptual(torch.autograd.Function):
    """The perceptual loss over a batch, a few images at a time, each chunk's gradient computed at once.

    Mean over the batch = sum over chunks of (chunk mean x chunk size / batch size). Doing the VGG backward
    right after each chunk's forward keeps one chunk's activations alive instead of the batch's (8x224x224:
    ~100 MB tensors, beyond the allocator's reuse threshold and the caches, measured slower per image); the
    returned loss's backward then only scales the stored gradient. Not twice differentiable."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, net: nn.Module, binary: bool, chunk: int):
        n = pred.shape[0]
        total = pred.new_zeros(())
        grad = torch.empty_like(pred)
        for i in range(0, n, chunk):
            part_pred = pred[i : i + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                part = _perceptual_terms(net, part_pred, target[i : i + chunk], binary) * (part_pred.shape[0] / n)
                (grad[i : i + chunk],) = torch.autograd.grad(part, part_pred)
            total += part.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


class PerceptualLoss(nn.Module):
    """Eq. 3 between a predicted and a ground-truth map, both ``(N, 1, H, W)`` in [0, 1].

    ``cpu_optimized`` (``"auto"``: for CPU inputs) evaluates VGG16 through
    :meth:`VGG16Features.cpu_optimized`, ``chunk`` images at a time (see :class:`_ChunkedPerceptual`); on GPUs
    the plain network is used on the whole batch (cuDNN picks its own algorithms)."""

    def __init__(self, weights: str = "imagenet", cpu_optimized: bool | str = "auto", chunk: int = 2) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.vgg = VGG16Features(weights)
        self.cpu_optimized = cpu_optimized
        self.chunk = chunk
        # the CPU copy is derived from self.vgg (kept in a tuple: not a submodule, not in the state dict);
        # loading new weights invalidates it
        self._fast: tuple[VGG16Features, torch.device] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_fast", None))

    @property
    def weights_info(self) -> WeightsInfo:
        return self.vgg.weights_info

    def _use_fast(self, device: torch.device) -> bool:
        return self.cpu_optimized is True or (self.cpu_optimized == "auto" and device.type == "cpu")

    def network(self, device: torch.device) -> VGG16Features:
        """The VGG16 evaluation used for inputs on ``device``."""
        if not self._use_fast(device):
            return self.vgg
        if self._fast is None or self._fast[1] != device:
            self._fast = (self.vgg.cpu_optimized().to(device), device)
        return self._fast[0]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
            raise ValueError(
                f"pred and target must both be (N, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        net = self.network(pred.device)
        pred, target = pred.float(), target.float()
        binary = bool(((target == 0) | (target == 1)).all())
        if not self._use_fast(pred.device):
            return _perceptual_terms(net, pred, target, binary)
        if torch.is_grad_enabled() and pred.requires_grad:
            return _ChunkedPerceptual.apply(pred, target, net, binary, self.chunk)
        with torch.no_grad():
            n = pred.shape[0]
            parts = [
                _perceptual_terms(net, pred[i : i + self.chunk], target[i : i + self.chunk], binary)
                * (min(self.chunk, n - i) / n)
                for i in range(0, n, self.chunk)
            ]
        return torch.stack(parts).sum()


class SegmentationLoss(nn.Module):
    """``L = L_ce + beta · L_per``; returns ``(total, {"ce": ..., "perceptual": ...})``, the parts detached.

    With ``beta == 0`` the VGG is never built and ``perceptual`` is reported as 0."""

    def __init__(self, beta: float = 0.1, vgg_weights: str = "imagenet", cpu_optimized: bool | str = "auto") -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.perceptual = PerceptualLoss(vgg_weights, cpu_optimized=cpu_optimized) if self.beta > 0 else None

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
