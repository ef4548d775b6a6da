"""A perceptual-loss tap fused with its ReLU and the 2x2 max-pool after it, for CPUs.

At a tap of a frozen feature network (VGG16's relu1_2, relu2_2, relu3_3, relu4_3) the loss needs
``mean((relu(a) - t)^2)`` against the target's features ``t``, and the network goes on with
``max_pool2d(relu(a), 2)``. :func:`fused_tap` computes both in one pass over ``a``, and the gradient with
respect to ``a`` in one more (``nucleiseg/kernels/feature_taps.c``), where torch's separate ops take about
nine passes over the feature map (at 2x64x224x224, ~100 MB each). The values are the same as the unfused
ops' up to float rounding (the sum is accumulated in float64); max-pool ties go to the first position, as
in torch. For float32 CPU tensors with channel counts that are multiples of 8, when a C compiler is
available (:func:`available`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from nucleiseg import native

_SOURCE = Path(__file__).parents[1] / "kernels" / "feature_taps.c"
_P, _I = ctypes.c_void_p, ctypes.c_long
_SIGNATURES = (
    ("tap_forward", ctypes.c_double, (_P, _P, _P, _P, _P, _P, _I, _I, _I, _I)),
    ("tap_backward", None, (_P, _P, _P, _P, ctypes.c_float, _P, _I, _I, _I, _I)),
)
_CL = torch.channels_last


def _library() -> ctypes.CDLL | None:
    return native.load(_SOURCE, _SIGNATURES)


def available(a: torch.Tensor) -> bool:
    """Whether :func:`fused_tap` can take ``a`` (N, C, H, W)."""
    return (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and a.ndim == 4
        and a.shape[1] % 8 == 0
        and (_library() is not None)
    )


def fused_tap(a: torch.Tensor, target: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean((relu(a) - target)^2), max_pool2d(relu(a), 2) if pool else None)``, differentiable in ``a``.

    ``target`` is a constant (no gradient). The pooled map is channels-last."""
    if target.shape != a.shape:
        raise ValueError(f"target features {tuple(target.shape)} do not match {tuple(a.shape)}")
    if not available(a):
        raise ValueError("fused_tap needs float32 CPU tensors with channels in multiples of 8 and a C compiler")
    if pool:
        return _FusedTap.apply(a, target.detach(), True)
    return _FusedTap.apply(a, target.detach(), False)[0], None


class _FusedTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, target: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lib = _library()
        a = a.contiguous(memory_format=_CL)
        target = target.contiguous(memory_format=_CL)
        n, c, h, w = a.shape
        diff = torch.empty_like(a, memory_format=_CL)
        ph, pw = (h // 2, w // 2) if pool else (0, 0)
        pooled = torch.empty((n, c, ph, pw), dtype=a.dtype, memory_format=_CL)
        argmax = torch.empty((n, ph, pw, c), dtype=torch.uint8)
        row_sums = torch.empty(n * h, dtype=torch.float64)
        pooled_ptr, argmax_ptr = (pooled.data_ptr(), argmax.data_ptr()) if pool else (None, None)
        total = lib.tap_forward(
            a.data_ptr(), target.data_ptr(), diff.data_ptr(), pooled_ptr, argmax_ptr, row_sums.data_ptr(), n, h, w, c
        )
        ctx.pool = pool
        ctx.save_for_backward(a, diff, argmax)
        return a.new_tensor(total / a.numel()), pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_term: torch.Tensor, grad_pooled: torch.Tensor | None):
        lib = _library()
        a, diff, argmax = ctx.saved_tensors
        n, c, h, w = a.shape
        scale = 0.0 if grad_term is None else float(grad_term) * 2.0 / a.numel()
        if ctx.pool and grad_pooled is not None:
            grad_pooled = grad_pooled.contiguous(memory_format=_CL)
            pooled_ptr, argmax_ptr = grad_pooled.data_ptr(), argmax.data_ptr()
        else:
            pooled_ptr, argmax_ptr = None, None
        grad_a = torch.empty_like(a, memory_format=_CL)
        lib.tap_backward(a.data_ptr(), diff.data_ptr(), pooled_ptr, argmax_ptr, scale, grad_a.data_ptr(), n, h, w, c)
        return grad_a, None, None
