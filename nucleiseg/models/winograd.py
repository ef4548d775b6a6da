"""Frozen 3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3) (Lavin & Gray, 2016).

A stride-1, padding-1 3x3 convolution is computed tile by tile: each 6x6 input tile ``d`` and the 3x3
kernel ``g`` are mapped to the 6x6 "Winograd domain" (``V = Bᵀ d B``, ``U = G g Gᵀ``), multiplied
elementwise there (36 matrix products over channels), and mapped back to a 4x4 output tile
(``Y = Aᵀ (U ⊙ V) A``). That is the same convolution with 36 instead of 144 multiplications per tile and
channel pair; float32 results differ from the direct algorithm only by rounding (relative error ~1e-6).

On CPUs oneDNN's direct convolution is compute-bound, so 4x fewer multiplications pay off for layers
with many channels on small maps (VGG16 blocks 2-4: ~2x faster, measured); the tile transforms are
memory-bound, which is why a layer with 64 channels on a 224x224 map is faster direct.

Only frozen layers are supported (the perceptual loss's VGG16): the weights get no gradient, and the
input gradient is itself a Winograd convolution, with the kernel flipped and its channels transposed.
Activations are kept channels-last (NHWC in memory), which the transforms read contiguously.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# F(4x4, 3x3) with interpolation points 0, ±1, ±2, ∞
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_TILE = 4  # output tile side
# Tiles are processed in chunks: about CHUNK_BYTES of Winograd-domain data keeps the memory-bound transforms
# in cache (measured 2x faster than whole batches at 8x224x224), at least MIN_CHUNK_TILES keeps the
# matrix products large enough to be efficient.
CHUNK_BYTES = 8 << 20
MIN_CHUNK_TILES = 196
_BIAS_SLOT = 7  # (1, 1) in the 6x6 domain: Aᵀ e1 e1ᵀ A is all ones, so adding the bias there adds it everywhere


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """``G g Gᵀ`` for a ``(K, C, 3, 3)`` weight, as ``(36, C, K)`` matrices (computed in float64)."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"Winograd F(4x4, 3x3) needs 3x3 kernels, got {tuple(weight.shape)}")
    g = _G.to(weight.device)
    u = g @ weight.double() @ g.T  # (K, C, 6, 6)
    return u.permute(2, 3, 1, 0).reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _input_transform(d: list[torch.Tensor], out: list[torch.Tensor] | torch.Tensor) -> None:
    """``Bᵀ d`` along one axis: six views ``d`` to ``out[0..5]``, using the outputs as scratch space."""
    d0, d1, d2, d3, d4, d5 = d
    torch.add(d4, d2, alpha=-4, out=out[1])  # a = d4 - 4 d2
    torch.add(d3, d1, alpha=-4, out=out[2])  # b = d3 - 4 d1
    out[1].add_(out[2])  # a + b
    torch.add(out[1], out[2], alpha=-2, out=out[2])  # a - b
    torch.sub(d4, d2, out=out[3])  # c = d4 - d2
    torch.sub(d3, d1, out=out[4])  # e = d3 - d1
    out[3].add_(out[4], alpha=2)  # c + 2 e
    torch.add(out[3], out[4], alpha=-4, out=out[4])  # c - 2 e
    torch.add(d4, d2, alpha=-5, out=out[0]).add_(d0, alpha=4)
    torch.add(d5, d3, alpha=-5, out=out[5]).add_(d1, alpha=4)


def _output_transform(m: list[torch.Tensor], out: list[torch.Tensor], scratch: torch.Tensor) -> None:
    """``Aᵀ m`` along one axis: six views ``m`` to four outputs; ``scratch`` is shaped like one output."""
    m0, m1, m2, m3, m4, m5 = m
    s12 = torch.add(m1, m2, out=scratch)
    torch.add(m3, m4, out=out[2])  # s34
    torch.add(s12, out[2], out=out[0]).add_(m0)  # y0 = m0 + s12 + s34
    torch.add(s12, out[2], alpha=4, out=out[2])  # y2 = s12 + 4 s34
    torch.sub(m1, m2, out=out[1])  # d12
    torch.sub(m3, m4, out=out[3])  # d34
    out[1].add_(out[3], alpha=2)  # y1 = d12 + 2 d34
    torch.add(out[1], out[3], alpha=6, out=out[3]).add_(m5)  # y3 = d12 + 8 d34 + m5


def winograd_conv3x3(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, max_tiles: int | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``u = kernel_transform(weight)``; returns channels-last.

    Tiles are processed in chunks of at most ``max_tiles`` (default: about ``CHUNK_BYTES`` of
    Winograd-domain data, at least ``MIN_CHUNK_TILES``): whole images, or bands of tile rows of one image."""
    n, c, h, w = x.shape
    if u.shape[1] != c:
        raise ValueError(f"input has {c} channels, the kernel expects {u.shape[1]}")
    k = u.shape[2]
    th, tw = -(-h // _TILE), -(-w // _TILE)
    # zero padding: 1 on each side for the convolution, more bottom/right to complete the last tiles
    xp = _pad_nhwc(x, th * _TILE + 2, tw * _TILE + 2)
    # the result is allocated as the returned tensor (not a view: autograd's in-place checks need a base)
    y = torch.empty(n, k, th * _TILE, tw * _TILE, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    tiles = y.permute(0, 2, 3, 1).view(n, th, _TILE, tw, _TILE, k)
    if max_tiles is None:
        max_tiles = max(MIN_CHUNK_TILES, CHUNK_BYTES // (36 * max(c, k) * x.element_size()))
    if th * tw <= max_tiles:  # whole images per chunk
        images, tile_rows = max(1, max_tiles // (th * tw)), th
    else:  # bands of tile rows of one image
        images, tile_rows = 1, max(1, max_tiles // tw)
    # one workspace for all chunks: fresh multi-megabyte allocations per chunk cost page faults (measured:
    # a matrix product into a new tensor ran at half the speed of one into a reused buffer)
    workspace = _Workspace(x, min(images, n) * min(tile_rows, th), tw, xp.shape[2], c, k)
    for i0 in range(0, n, images):
        for r0 in range(0, th, tile_rows):
            i1, r1 = min(n, i0 + images), min(th, r0 + tile_rows)
            src = xp[i0:i1, _TILE * r0 : _TILE * r1 + 2]
            _winograd_chunk(src, u, bias, tiles[i0:i1, r0:r1], workspace)
    if (th * _TILE, tw * _TILE) != (h, w):
        y = y[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return y


def _pad_nhwc(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` (N, C, H, W) copied into a zero-bordered NHWC buffer (N, height, width, C) at offset (1, 1).

    Only the border is zeroed (``F.pad`` fills the whole buffer first: one more pass over memory)."""
    n, c, h, w = x.shape
    xp = x.new_empty(n, height, width, c)
    xp[:, 0].zero_()
    xp[:, h + 1 :].zero_()
    xp[:, 1 : h + 1, 0].zero_()
    xp[:, 1 : h + 1, w + 1 :].zero_()
    xp[:, 1 : h + 1, 1 : w + 1].copy_(x.permute(0, 2, 3, 1))
    return xp


class _Workspace:
    """Flat buffers sized for the largest chunk; each chunk views the front of them in its own shape."""

    def __init__(self, like: torch.Tensor, tile_rows: int, tw: int, padded_width: int, c: int, k: int) -> None:
        tiles = tile_rows * tw
        self.rows = like.new_empty(6 * tile_rows * padded_width * c)
        self.v = like.new_empty(36 * tiles * c)
        self.m = like.new_empty(36 * tiles * k)
        self.partial = like.new_empty(24 * tiles * k)
        self.scratch = like.new_empty(6 * tiles * k)

    @staticmethod
    def take(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
        return buffer[: math.prod(shape)].view(shape)


def _winograd_chunk(
    src: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, ws: _Workspace
) -> None:
    """Padded NHWC input rows ``src`` -> output tiles ``out`` (N, th, 4, tw, 4, K)."""
    n, th, _, tw, _, k = out.shape
    c = src.shape[-1]
    rows = ws.take(ws.rows, 6, n, th, src.shape[2], c)
    _input_transform([src[:, a : a + _TILE * th : _TILE] for a in range(6)], rows)
    v = ws.take(ws.v, 6, 6, n, th, tw, c)
    _input_transform([rows[:, :, :, a : a + _TILE * tw : _TILE] for a in range(6)], v.transpose(0, 1))
    m = ws.take(ws.m, 36, n * th * tw, k)
    torch.bmm(v.view(36, n * th * tw, c), u, out=m)
    if bias is not None:
        m[_BIAS_SLOT].add_(bias)
    m = m.view(6, 6, n, th, tw, k)
    partial = ws.take(ws.partial, 4, 6, n, th, tw, k)
    scratch = ws.take(ws.scratch, 6, n, th, tw, k)
    _output_transform(list(m), list(partial), scratch)
    _output_transform(
        list(partial.transpose(0, 1)),
        [out[:, :, :, :, col].permute(2, 0, 1, 3, 4) for col in range(4)],
        scratch[:4],
    )


class _FrozenWinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, u_grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u_grad)
        return winograd_conv3x3(x, u, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (u_grad,) = ctx.saved_tensors
        return winograd_conv3x3(grad, u_grad), None, None, None


class FrozenWinogradConv2d(nn.Module):
    """A frozen ``Conv2d(C, K, 3, padding=1)`` evaluated with F(4x4, 3x3); gradients flow to the input only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach()
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]
        self.register_buffer("u", kernel_transform(weight))
        # the input gradient of a correlation is the correlation of the output gradient with the kernel
        # flipped in space and transposed in channels (padding 1 keeps the size)
        self.register_buffer("u_grad", kernel_transform(weight.flip(2, 3).transpose(0, 1)))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0]))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> FrozenWinogradConv2d:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError(f"only 3x3, stride 1, padding 1, ungrouped convolutions are supported, got {conv}")
        if conv.dilation != (1, 1):
            raise ValueError(f"dilated convolutions are not supported, got {conv}")
        return cls(conv.weight, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenWinogradConv.apply(x, self.u, self.u_grad, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), algorithm=F(4x4, 3x3)"
