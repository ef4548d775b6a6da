"""Frozen 3x3 convolutions by Winograd's minimal filtering algorithms F(4x4, 3x3) and F(6x6, 3x3)
(Lavin & Gray, 2016).

A stride-1, padding-1 3x3 convolution is computed tile by tile: for F(4x4, 3x3) each 6x6 input tile ``d``
and the 3x3 kernel ``g`` are mapped to the 6x6 "Winograd domain" (``V = Bᵀ d B``, ``U = G g Gᵀ``),
multiplied elementwise there (36 matrix products over channels), and mapped back to a 4x4 output tile
(``Y = Aᵀ (U ⊙ V) A``): 36 instead of 144 multiplications per tile and channel pair. F(6x6, 3x3) maps
8x8 tiles to 6x6 outputs: 64 instead of 324 (the tiles pad 56- and 28-pixel maps to 60 and 30: 9% fewer
multiplications there than F(4x4, 3x3), 18% at 112). float32 results differ from the direct algorithm only
by rounding (max relative error ~7e-6 for F(4x4), ~1e-5 for F(6x6) at 256 channels, measured).

On CPUs oneDNN's direct convolution is compute-bound, so 4x fewer multiplications pay off as long as
the memory-bound tile transforms are cheap. They are C loops (``nucleiseg/kernels/winograd_transforms.c``,
compiled on first use by :mod:`nucleiseg.native`) that read the input and write the Winograd domain once
each, in chunks of tiles that the matrix products (``torch.bmm``) then consume while they are still in
cache. Without a C compiler the same algorithm runs with torch's elementwise ops (several passes over
memory: slower).

Only frozen layers are supported (the perceptual loss's VGG16): the weights get no gradient, and the
input gradient is itself a Winograd convolution, with the kernel flipped and its channels transposed.
A following ReLU can be fused (``relu=True``): applied in the output transform, and its backward (the
gradient zeroed where the output is not positive) in the backward's input transform, two passes over every
activation saved. Activations are kept channels-last (NHWC in memory), which the transforms read
contiguously.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
from torch import nn

from nucleiseg import native

# F(4x4, 3x3) with interpolation points 0, ±1, ±2, ∞
_G4 = torch.tensor(
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
# F(6x6, 3x3) with interpolation points 0, ±1, ±2, ±1/2, ∞ (its Bᵀ and Aᵀ are in the C transforms)
_G6 = torch.tensor(
    [
        [1, 0, 0],
        [-2 / 9, -2 / 9, -2 / 9],
        [-2 / 9, 2 / 9, -2 / 9],
        [1 / 90, 1 / 45, 2 / 45],
        [1 / 90, -1 / 45, 2 / 45],
        [32 / 45, 16 / 45, 8 / 45],
        [32 / 45, -16 / 45, 8 / 45],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_KERNEL_MATRICES = {4: _G4, 6: _G6}
_TILE = 4  # output tile side of the torch-op implementation
# Tiles are processed in chunks: about CHUNK_BYTES of Winograd-domain data keeps the memory-bound transforms
# in cache (measured 2x faster than whole batches at 8x224x224), at least MIN_CHUNK_TILES keeps the
# matrix products large enough to be efficient.
CHUNK_BYTES = 8 << 20
MIN_CHUNK_TILES = 196
_TRANSFORMS_SOURCE = Path(__file__).parents[1] / "kernels" / "winograd_transforms.c"
_P, _I = ctypes.c_void_p, ctypes.c_long
_TRANSFORMS_SIGNATURES = tuple(
    signature
    for tile in _KERNEL_MATRICES
    for signature in (
        (f"winograd{tile}_input", None, (_P, _P, _P, _I, _I, _I, _I, _I)),
        (f"winograd{tile}_output", None, (_P, _P, ctypes.c_int, _P, _I, _I, _I, _I, _I)),
    )
)
_BIAS_SLOT = 7  # (1, 1) in the 6x6 domain: Aᵀ e1 e1ᵀ A is all ones, so adding the bias there adds it everywhere


def kernel_transform(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """``G g Gᵀ`` of F(tile x tile, 3x3) for a ``(K, C, 3, 3)`` weight, as ``((tile + 2)², C, K)`` matrices
    (computed in float64)."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"Winograd F(m x m, 3x3) needs 3x3 kernels, got {tuple(weight.shape)}")
    if tile not in _KERNEL_MATRICES:
        raise ValueError(f"tile must be one of {sorted(_KERNEL_MATRICES)}, got {tile}")
    g = _KERNEL_MATRICES[tile].to(weight.device)
    u = g @ weight.double() @ g.T  # (K, C, n, n)
    n2 = (tile + 2) ** 2
    return u.permute(2, 3, 1, 0).reshape(n2, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def compiled_available() -> bool:
    """Whether the compiled tile transforms (and with them F(6x6, 3x3)) can be used on this machine."""
    return _transforms() is not None


def _tile_of(u: torch.Tensor) -> int:
    tiles = {(t + 2) ** 2: t for t in _KERNEL_MATRICES}
    if u.ndim != 3 or u.shape[0] not in tiles:
        raise ValueError(f"u must be kernel_transform's (36 or 64, C, K) matrices, got {tuple(u.shape)}")
    return tiles[u.shape[0]]


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
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    relu: bool = False,
    input_mask: torch.Tensor | None = None,
    max_tiles: int | None = None,
    workspace: WinogradWorkspace | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``u = kernel_transform(weight)``; returns channels-last.

    ``relu`` applies ``max(·, 0)`` to the result; ``input_mask`` (shaped like ``x``) makes ``x`` count as
    zero wherever the mask is not positive (the backward pass of a fused ReLU). Tiles are processed in chunks
    of at most ``max_tiles`` (default: about ``CHUNK_BYTES`` of Winograd-domain data, at least
    ``MIN_CHUNK_TILES``). ``workspace`` keeps the scratch buffers between calls. ``compiled`` chooses the
    compiled transforms (default: when they are available, for float32 CPU tensors with channel counts that
    are multiples of 8) or the torch-op ones. The tile size, F(4x4, 3x3) or F(6x6, 3x3), follows from ``u``;
    F(6x6, 3x3) has compiled transforms only."""
    c = x.shape[1]
    if u.shape[1] != c:
        raise ValueError(f"input has {c} channels, the kernel expects {u.shape[1]}")
    if input_mask is not None and input_mask.shape != x.shape:
        raise ValueError(f"input_mask must be shaped like the input {tuple(x.shape)}, got {tuple(input_mask.shape)}")
    k, tile = u.shape[2], _tile_of(u)
    available = x.device.type == "cpu" and x.dtype == torch.float32 and c % 8 == 0 and k % 8 == 0
    available = available and _transforms() is not None
    compiled = available if compiled is None else compiled
    if compiled and not available:
        raise ValueError("the compiled transforms need float32 CPU tensors, channels in multiples of 8, a C compiler")
    if not compiled and tile != _TILE:
        raise ValueError(
            f"F({tile}x{tile}, 3x3) needs the compiled transforms (float32 CPU, channels in multiples of 8)"
        )
    workspace = workspace if workspace is not None else WinogradWorkspace()
    if compiled:
        return _conv_compiled(x, u, bias, relu, input_mask, max_tiles, workspace, tile)
    if input_mask is not None:
        x = x.masked_fill(input_mask <= 0, 0)
    y = _conv_torch_ops(x, u, bias, max_tiles, workspace)
    return y.relu_() if relu else y


def _transforms() -> ctypes.CDLL | None:
    """The compiled tile transforms (:mod:`nucleiseg.native`), or None without a C compiler."""
    return native.load(_TRANSFORMS_SOURCE, _TRANSFORMS_SIGNATURES)


def _conv_compiled(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    input_mask: torch.Tensor | None,
    max_tiles: int | None,
    workspace: WinogradWorkspace,
    tile: int,
) -> torch.Tensor:
    lib = _transforms()
    input_transform = getattr(lib, f"winograd{tile}_input")
    output_transform = getattr(lib, f"winograd{tile}_output")
    n, c, h, w = x.shape
    k, n2 = u.shape[2], (tile + 2) ** 2
    th, tw = -(-h // tile), -(-w // tile)
    # the C loops read raw NHWC memory: these are views (no copies) for channels-last inputs
    x_nhwc = x.detach().permute(0, 2, 3, 1).contiguous()
    mask = None if input_mask is None else input_mask.detach().permute(0, 2, 3, 1).contiguous()
    bias = x.new_zeros(k) if bias is None else bias.detach().float().contiguous()
    u = u.contiguous()
    y = torch.empty(n, k, h, w, dtype=x.dtype, memory_format=torch.channels_last)
    if max_tiles is None:
        max_tiles = max(MIN_CHUNK_TILES, CHUNK_BYTES // (n2 * max(c, k) * x.element_size()))
    tile_rows = max(1, max_tiles // tw)
    mask_ptr = mask.data_ptr() if mask is not None else None
    for r0 in range(0, n * th, tile_rows):
        r1 = min(n * th, r0 + tile_rows)
        tiles = (r1 - r0) * tw
        v = workspace.take("v", x, tiles, n2, c)
        m = workspace.take("m", x, n2, tiles, k)
        input_transform(x_nhwc.data_ptr(), mask_ptr, v.data_ptr(), h, w, c, r0, r1)
        torch.bmm(v.transpose(0, 1), u, out=m)
        output_transform(m.data_ptr(), bias.data_ptr(), int(relu), y.data_ptr(), h, w, k, r0, r1)
    return y


class WinogradWorkspace:
    """Scratch buffers for :func:`winograd_conv3x3` calls made one after another (the layers of one network,
    forward and backward), kept at the largest size asked for. Fresh multi-megabyte buffers are page-faulted
    in on every use (measured here: ~0.4 ms per MB, as much as a layer's transforms). Not for calls running
    at the same time from several threads."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with the dtype and device of ``like``, a view of buffer ``name``
        (grown when too small)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or (buffer.dtype, buffer.device) != (like.dtype, like.device):
            buffer = self._buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)

    def __deepcopy__(self, memo: dict) -> WinogradWorkspace:
        return WinogradWorkspace()  # scratch: nothing worth copying


def _conv_torch_ops(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, max_tiles: int | None, workspace: WinogradWorkspace
) -> torch.Tensor:
    """The torch-op implementation: tiles in chunks of whole images or bands of tile rows of one image."""
    n, c, h, w = x.shape
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


def _winograd_chunk(
    src: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, ws: WinogradWorkspace
) -> None:
    """Padded NHWC input rows ``src`` -> output tiles ``out`` (N, th, 4, tw, 4, K)."""
    n, th, _, tw, _, k = out.shape
    c = src.shape[-1]
    rows = ws.take("rows", src, 6, n, th, src.shape[2], c)
    _input_transform([src[:, a : a + _TILE * th : _TILE] for a in range(6)], rows)
    v = ws.take("v", src, 6, 6, n, th, tw, c)
    _input_transform([rows[:, :, :, a : a + _TILE * tw : _TILE] for a in range(6)], v.transpose(0, 1))
    m = ws.take("m", src, 36, n * th * tw, k)
    torch.bmm(v.view(36, n * th * tw, c), u, out=m)
    if bias is not None:
        m[_BIAS_SLOT].add_(bias)
    m = m.view(6, 6, n, th, tw, k)
    partial = ws.take("partial", src, 4, 6, n, th, tw, k)
    scratch = ws.take("scratch", src, 6, n, th, tw, k)
    _output_transform(list(m), list(partial), scratch)
    _output_transform(
        list(partial.transpose(0, 1)),
        [out[:, :, :, :, col].permute(2, 0, 1, 3, 4) for col in range(4)],
        scratch[:4],
    )


class _FrozenWinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, u_grad, bias, relu: bool, workspace: WinogradWorkspace) -> torch.Tensor:
        y = winograd_conv3x3(x, u, bias, relu=relu, workspace=workspace)
        ctx.workspace = workspace
        ctx.save_for_backward(u_grad, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        u_grad, y = ctx.saved_tensors
        # a fused ReLU passes the gradient where its output is positive (as torch's threshold_backward)
        return winograd_conv3x3(grad, u_grad, input_mask=y, workspace=ctx.workspace), None, None, None, None, None


class FrozenWinogradConv2d(nn.Module):
    """A frozen ``Conv2d(C, K, 3, padding=1)`` evaluated with F(tile x tile, 3x3), followed by a ReLU when
    ``relu=True``; gradients flow to the input only. Layers of one network may share a ``workspace``.
    ``tile=6`` (fewer multiplications: 64 per 36 outputs instead of 36 per 16) needs the compiled transforms."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        relu: bool = False,
        workspace: WinogradWorkspace | None = None,
        tile: int = 4,
    ) -> None:
        super().__init__()
        weight = weight.detach()
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]
        self.relu, self.tile = relu, tile
        self.workspace = workspace if workspace is not None else WinogradWorkspace()
        self.register_buffer("u", kernel_transform(weight, tile))
        # the input gradient of a correlation is the correlation of the output gradient with the kernel
        # flipped in space and transposed in channels (padding 1 keeps the size)
        self.register_buffer("u_grad", kernel_transform(weight.flip(2, 3).transpose(0, 1), tile))
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0]))

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, relu: bool = False, workspace: WinogradWorkspace | None = None, tile: int = 4
    ) -> FrozenWinogradConv2d:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError(f"only 3x3, stride 1, padding 1, ungrouped convolutions are supported, got {conv}")
        if conv.dilation != (1, 1):
            raise ValueError(f"dilated convolutions are not supported, got {conv}")
        return cls(conv.weight, conv.bias, relu=relu, workspace=workspace, tile=tile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenWinogradConv.apply(x, self.u, self.u_grad, self.bias, self.relu, self.workspace)

    def extra_repr(self) -> str:
        relu = ", relu=True" if self.relu else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1){relu}, "
            f"algorithm=F({self.tile}x{self.tile}, 3x3)"
        )
