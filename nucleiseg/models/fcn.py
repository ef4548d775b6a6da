"""FCN-8s (Long et al. 2015) on a VGG16 backbone: the second baseline of the paper's Table 1.

- :class:`VGG16Encoder`: torchvision's VGG16 convolutions with the fully connected ``fc6``/``fc7`` turned
  into 7x7 and 1x1 convolutions; it returns pool3, pool4 and fc7 (strides 8, 16, 32). With ImageNet
  weights the fc layers get the classifier's weights reshaped, as in the original FCN.
- :class:`FCN8sDecoder`: class scores from fc7 upsampled x2 (bilinear-initialised transposed conv), fused
  with pool4's scores, upsampled x2, fused with pool3's scores; the head upsamples x8.

Decision: ``fc6`` uses padding 3 and the upsamplings are sized exactly, instead of the original
100-pixel input padding and cropping, so outputs align with inputs of any size divisible by 32.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from nucleiseg.models.base import SegmentationModel
from nucleiseg.weights import load_matching, vgg16_state_dict

# indices in torchvision's vgg16().features after which pool3 and pool4 are available
_POOL3_END, _POOL4_END = 17, 24


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """Weights of a per-channel bilinear upsampling transposed convolution (FCN's initialisation)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    grid = torch.arange(size, dtype=torch.float32)
    filt1d = 1 - (grid - center).abs() / factor
    kernel = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = kernel
    return weight


def _upsample(channels: int, scale: int) -> nn.ConvTranspose2d:
    up = nn.ConvTranspose2d(channels, channels, kernel_size=2 * scale, stride=scale, padding=scale // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * scale))
    return up


class VGG16Encoder(nn.Module):
    """VGG16 as a fully convolutional feature extractor: pool3 (256), pool4 (512), fc7 (4096)."""

    channels = (256, 512, 4096)
    reductions = (8, 16, 32)

    def __init__(self, weights: str = "imagenet", fc_dropout: float = 0.5) -> None:
        super().__init__()
        self.features = make_layers(cfgs["D"], batch_norm=False)
        self.fc6 = nn.Conv2d(512, 4096, kernel_size=7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout2d(fc_dropout)
        self.name = "vgg16"
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)
        state, self.weights_info = vgg16_state_dict(weights)
        if state is not None:
            self._load(state, weights)

    def _load(self, state: dict[str, torch.Tensor], file: str) -> None:
        load_matching(self.features, state, file)
        with torch.no_grad():
            for conv, key in ((self.fc6, "classifier.0"), (self.fc7, "classifier.3")):
                if f"{key}.weight" in state and state[f"{key}.weight"].numel() == conv.weight.numel():
                    conv.weight.copy_(state[f"{key}.weight"].reshape(conv.weight.shape))
                    conv.bias.copy_(state[f"{key}.bias"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pool3 = self.features[:_POOL3_END](x)
        pool4 = self.features[_POOL3_END:_POOL4_END](pool3)
        pool5 = self.features[_POOL4_END:](pool4)
        fc7 = self.drop(self.act(self.fc7(self.drop(self.act(self.fc6(pool5))))))
        return [pool3, pool4, fc7]


class FCN8sDecoder(nn.Module):
    """Score and fuse the three maps; output: class scores at stride 8."""

    def __init__(self, encoder_channels: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c3, c4, c7 = encoder_channels
        self.score_fr = nn.Conv2d(c7, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):  # FCN starts its score layers at zero
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.up_fr = _upsample(num_classes, 2)
        self.up_pool4 = _upsample(num_classes, 2)
        self.out_channels = num_classes
        self.out_reduction = 8

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pool3, pool4, fc7 = features
        x = self.up_fr(self.score_fr(fc7)) + self.score_pool4(pool4)
        return self.up_pool4(x) + self.score_pool3(pool3)


class FCNHead(nn.Module):
    """The final x8 bilinear-initialised transposed convolution."""

    def __init__(self, num_classes: int, reduction: int = 8) -> None:
        super().__init__()
        self.up = _upsample(num_classes, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def fcn8s(encoder_weights: str = "imagenet", num_classes: int = 5) -> SegmentationModel:
    """Build FCN-8s; ``encoder_weights`` applies to the VGG16 backbone (and its fc6/fc7)."""
    enc = VGG16Encoder(encoder_weights)
    decoder = FCN8sDecoder(enc.channels, num_classes)
    return SegmentationModel(
        enc, decoder, FCNHead(num_classes, decoder.out_reduction), name="fcn8s", num_classes=num_classes
    )
