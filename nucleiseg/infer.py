"""Inference: sliding-window prediction of the 5 maps over images of any size, with optional TTA.

Definitions
-----------
maps
    The network's 5 output channels: 0 background, 1 inside of a tumor nucleus, 2 inside of a lymphocyte,
    3 inside of a stroma nucleus, 4 contour. *Probabilities* are their softmax over the channel axis.
tiling
    The reference code's scheme (``split_forward`` in github.com/huiqu18/NucleiSegClas), with reflect instead
    of zero padding. Along each axis of length ``L`` the tiles start every ``stride = tile - overlap`` pixels,
    ``n = max(1, ceil((L - overlap) / stride))`` of them, and the image is reflect-padded at the bottom and
    right to ``(n - 1) * stride + tile`` so that every tile is a full ``tile x tile`` square (the network needs
    sides divisible by 32). From each tile only its central part is kept: ``overlap // 2`` pixels are dropped
    on each inner side, none on the image's own border, so every output pixel comes from exactly one tile,
    the one in which it is most central; pixels on the image border come from the border tiles.
TTA
    Test-time augmentation over the 8 symmetries of the square (4 rotations by 90 degrees, each with and
    without a horizontal flip), applied per tile: the probabilities of the 8 transformed tiles are mapped back
    and averaged (averaged in probability space, as the reference code does for the whole image).
input normalisation
    ``x = (rgb / 255 - mean) / std`` per channel, ``mean`` and ``std`` in 0-1 units (as torchvision's
    ``ToTensor`` then ``Normalize``, which is what the reference code trains with).

Speed: tiles are run in batches (``batch_size``) under ``torch.inference_mode`` with channels_last tensors,
normalised once per row of tiles; on CUDA in bfloat16 autocast (softmax in float32).

Memory: the image is processed one row of tiles at a time; only that strip (``tile`` rows, as uint8 and as
normalised float32) and one batch of tiles live at once besides the output. :func:`predict_classes` returns the
argmax map (``uint8``, 1 byte per pixel), which is all the post-processing needs: :func:`predict_label` on a
10000 x 10000 image peaks at about 2 GiB of resident memory, image and Python included (about 10 bytes per
pixel, mostly the post-processing's int32 maps). :func:`predict_probabilities` returns the full ``(5, H, W)``
maps (20 bytes per pixel in float32, 10 in float16) for callers that need them. A model's stain normalisation
streams too (:meth:`Predictor.stain_transform`): the image's stain is measured in blocks of rows, and each strip
is normalised in float32 as it is cut, so no normalised or float copy of the image exists (benchmarks/README.md,
bench_predict_memory.py).

Loading a trained model is :func:`load_predictor` (checkpoint file, MLflow model URI or ONNX file; the network
run by torch or ONNX Runtime, :mod:`nucleiseg.onnx_model`); running it on files and writing the outputs is
:func:`predict_file` / :func:`predict_files`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

NUM_MAPS = 5
DEFAULT_TILE = 224
DEFAULT_OVERLAP = 80
DEFAULT_MODEL_MPP = 0.25  # microns per pixel assumed for models saved without one (CoNSeP's 40x)
BACKENDS = ("torch", "onnxruntime")  # what runs the network's forward pass (params infer.backend)

# Checkpoint / MLflow metadata keys (see load_predictor).
CHECKPOINT_KEYS = ("model_name", "model_kwargs", "state_dict", "norm_mean", "norm_std")


class ModelLoadError(ValueError):
    """A model reference cannot be loaded; the message names the checkpoint or URI and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisTile:
    """One tile position along an axis: the tile covers ``[start, start + tile)`` of the padded axis and
    contributes the output range ``[keep_start, keep_stop)`` (image coordinates)."""

    start: int
    keep_start: int
    keep_stop: int


def axis_tiles(length: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> list[AxisTile]:
    """Tile positions along one axis of ``length`` pixels (see the module docstring for the scheme)."""
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    stride = tile - overlap
    n = max(1, math.ceil((length - overlap) / stride))
    margin = overlap // 2  # dropped on the leading inner side; overlap - margin on the trailing one
    tiles = []
    for k in range(n):
        start = k * stride
        keep_start = 0 if k == 0 else start + margin
        keep_stop = length if k == n - 1 else start + tile - (overlap - margin)
        tiles.append(AxisTile(start, keep_start, keep_stop))
    return tiles


def reflect_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Map indices outside ``[0, length)`` into it by mirror reflection without repeating the edge pixel
    (``numpy.pad(mode="reflect")``), folding repeatedly for pads longer than the axis."""
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.mod(indices, period)
    return np.where(folded >= length, period - folded, folded)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean_a.shape != (3,) or std_a.shape != (3,):
        raise ValueError(f"mean and std need 3 values (R, G, B), got {list(mean_a)} and {list(std_a)}")
    if np.any(std_a <= 0) or not np.all(np.isfinite(mean_a)) or not np.all(np.isfinite(std_a)):
        raise ValueError(f"std must be positive and mean/std finite, got mean={list(mean_a)} std={list(std_a)}")
    if np.any(np.abs(mean_a) > 1.5) or np.any(std_a > 1.5):
        # 0-255 statistics would silently give garbage inputs; the contract is 0-1 units.
        raise ValueError(f"mean/std look like 0-255 units ({list(mean_a)}, {list(std_a)}); expected 0-1 units")
    return mean_a, std_a


# ----------------------------------------------------------------------------------------------------------
# Running the network on tiles
# ----------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (use 'cpu' or 'auto')")
    return device


# The 8 symmetries of the square as (number of 90-degree rotations, horizontal flip).
_D4 = tuple((k, flip) for flip in (False, True) for k in range(4))


def _forward(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return x.rot90(k, dims=(-2, -1)) if k else x


def _inverse(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if k:
        x = x.rot90(-k, dims=(-2, -1))
    return x.flip(-1) if flip else x


class _TileRunner:
    """Softmax probabilities of a batch of normalised tiles, with TTA, autocast and memory format set up once."""

    def __init__(self, model: torch.nn.Module, device: torch.device, tta: bool, channels_last: bool | None):
        import torch

        self.model = model
        self.device = device
        self.tta = tta
        on_cuda = device.type == "cuda"
        # channels_last speeds up cuDNN's bf16 convolutions and oneDNN's batched fp32 ones (benchmarks/README.md).
        self.channels_last = True if channels_last is None else channels_last
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else None

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is not None:
            with self.autocast:
                logits = self.model(x)
        else:
            logits = self.model(x)
        if logits.ndim != 4 or logits.shape[0] != x.shape[0] or logits.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"the model mapped a {tuple(x.shape)} input to {tuple(logits.shape)}; expected (N, C, H, W)"
            )
        return torch.softmax(logits.float(), dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tta:
            return self._probabilities(x)
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("TTA needs square tiles")
        total = None
        for k, flip in _D4:
            p = _inverse(self._probabilities(_forward(x, k, flip)), k, flip)
            total = p if total is None else total.add_(p)
        return total.div_(len(_D4))


def _iter_batches(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int,
    overlap: int,
    batch_size: int,
    tta: bool,
    device: str | torch.device,
    channels_last: bool | None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[AxisTile, list[AxisTile], torch.Tensor]]:
    """Yield ``(row tile, column tiles, probs (B, C, tile, tile))`` batch by batch, one row of tiles at a time.

    ``transform`` (a pixel-wise map of RGB uint8, e.g. a stain normaliser) is applied to each strip of tiles as
    it is cut, so the transformed image never exists whole."""
    import torch

    image = _check_image(image)
    mean_a, std_a = _check_norm(mean, std)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    height, width = image.shape[:2]
    row_tiles = axis_tiles(height, tile, overlap)
    col_tiles = axis_tiles(width, tile, overlap)
    padded_width = col_tiles[-1].start + tile
    col_index = reflect_indices(np.arange(padded_width), width)
    # x = rgb * scale + shift  ==  (rgb / 255 - mean) / std
    scale = torch.from_numpy(1.0 / (255.0 * std_a)).to(device).view(3, 1, 1)
    shift = torch.from_numpy(-mean_a / std_a).to(device).view(3, 1, 1)

    runner = _TileRunner(model, device, tta, channels_last)
    was_training = model.training
    model.eval()
    model.to(device)
    convs = [p for p in model.parameters() if p.ndim == 4]
    switch_format = runner.channels_last and not all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    if switch_format:
        model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            for rt in row_tiles:
                rows = reflect_indices(np.arange(rt.start, rt.start + tile), height)
                strip_u8 = image[rows][:, col_index]  # (tile, padded_width, 3) uint8, reflect-padded
                if transform is not None:  # pixel-wise: the same as transforming the image, then padding
                    strip_u8 = transform(strip_u8)
                strip = torch.from_numpy(strip_u8).to(device).permute(2, 0, 1).float()
                strip = strip.mul_(scale).add_(shift)  # normalised once per strip, not per overlapping tile
                for b in range(0, len(col_tiles), batch_size):
                    batch_tiles = col_tiles[b : b + batch_size]
                    x = torch.stack([strip[:, :, ct.start : ct.start + tile] for ct in batch_tiles])
                    yield rt, batch_tiles, runner(x)
    finally:
        model.train(was_training)
        if switch_format:  # leave the caller's model as it was (e.g. a model being trained)
            model.to(memory_format=torch.contiguous_format)


def _kept(rt: AxisTile, ct: AxisTile) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, tile rows, tile cols) of the kept part of tile ``(rt, ct)``."""
    return (
        slice(rt.keep_start, rt.keep_stop),
        slice(ct.keep_start, ct.keep_stop),
        slice(rt.keep_start - rt.start, rt.keep_stop - rt.start),
        slice(ct.keep_start - ct.start, ct.keep_stop - ct.start),
    )


def _argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """``argmax`` over dim 1 of ``(B, C, H, W)`` as ``uint8``, first maximum on ties (as ``torch.argmax``).

    Done as C - 1 elementwise comparisons of contiguous planes: several times faster on CPU than a strided
    reduction over the channel axis.
    """
    import torch

    best = probs[:, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best
        best = torch.where(better, probs[:, c], best)
        index.masked_fill_(better, c)
    return index


def iter_tile_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, cols, probs)``: the kept part of every tile, in raster order of the tiles.

    ``probs`` is a ``(C, len(rows), len(cols))`` float32 tensor on ``device``; the ``(rows, cols)`` regions
    partition the image. This is the building block of :func:`predict_probabilities`; use it to stream
    results (e.g. to disk) without holding any full-size map.
    The model is moved to ``device`` and put in eval mode (and channels_last) for the duration; its mode
    and memory format are restored afterwards. ``channels_last`` (None: on) sets the memory format of tiles and
    weights. ``transform``: a pixel-wise map applied to each strip of tiles before the network (a stain
    normaliser, :meth:`Predictor.stain_transform`).
    """
    batches = _iter_batches(model, image, mean, std, tile, overlap, batch_size, tta, device, channels_last, transform)
    for rt, cts, probs in batches:
        for ct, p in zip(cts, probs, strict=True):
            rows, cols, tile_rows, tile_cols = _kept(rt, ct)
            yield rows, cols, p[:, tile_rows, tile_cols]


def predict_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    dtype: np.dtype | type = np.float32,
    channels_last: bool | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The softmax probabilities ``(C, H, W)`` of an RGB ``uint8`` image of any size, by tiled prediction.

    ``dtype`` (float32 or float16) sets the returned array's type; float16 halves the memory of the maps
    (10 bytes per pixel for 5 maps). For post-processing alone use :func:`predict_classes`, which never holds
    the maps. See the module docstring for the tiling, TTA and normalisation.
    """
    image = _check_image(image)
    out: np.ndarray | None = None
    for rows, cols, p in iter_tile_probabilities(
        model, image, mean, std, tile, overlap, batch_size, tta, device, channels_last, transform
    ):
        if out is None:
            out = np.empty((p.shape[0], *image.shape[:2]), dtype=dtype)
        out[:, rows, cols] = p.cpu().numpy()
    assert out is not None  # an image has at least one tile
    return out


def predict_classes(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    channels_last: bool | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The per-pixel argmax of the (TTA-averaged) probabilities, ``uint8`` ``(H, W)`` with values 0-4.

    Equal to ``predict_probabilities(...).argmax(0)`` but memory-bounded: 1 byte per pixel plus one strip
    of tiles, whatever the image size. ``transform``: as for :func:`iter_tile_probabilities`.
    """
    image = _check_image(image)
    out = np.empty(image.shape[:2], dtype=np.uint8)
    batches = _iter_batches(model, image, mean, std, tile, overlap, batch_size, tta, device, channels_last, transform)
    for rt, cts, probs in batches:
        classes = _argmax_channels(probs).cpu().numpy()
        for ct, c in zip(cts, classes, strict=True):
            rows, cols, tile_rows, tile_cols = _kept(rt, ct)
            out[rows, cols] = c[tile_rows, tile_cols]
    return out


def predict_classes_and_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    dtype: np.dtype | type = np.float16,
    channels_last: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_classes` and :func:`predict_probabilities` from one network pass: the argmax map (``uint8``,
    taken on the float32 maps, so equal to :func:`predict_classes`) and the maps in ``dtype`` (float16: 10 bytes
    per pixel for 5 maps), for callers that need both, such as the per-nucleus class probabilities."""
    image = _check_image(image)
    classes = np.empty(image.shape[:2], dtype=np.uint8)
    probs: np.ndarray | None = None
    for rows, cols, p in iter_tile_probabilities(
        model, image, mean, std, tile, overlap, batch_size, tta, device, channels_last
    ):
        if probs is None:
            probs = np.empty((p.shape[0], *image.shape[:2]), dtype=dtype)
        classes[rows, cols] = _argmax_channels(p[None])[0].cpu().numpy()
        probs[:, rows, cols] = p.cpu().numpy()
    assert probs is not None  # an image has at least one tile
    return classes, probs


def predict_label(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 8,
    tta: bool = False,
    device: str | torch.device = "cpu",
    min_area: int = 20,
    radius: int = 1,
    channels_last: bool | None = None,
) -> np.ndarray:
    """The nuclei label (paper's encoding, ``int32``) of an RGB image: :func:`predict_classes` followed by
    :func:`nucleiseg.postprocess.postprocess`. Memory-bounded (see the module docstring)."""
    from nucleiseg.postprocess import postprocess

    classes = predict_classes(model, image, mean, std, tile, overlap, batch_size, tta, device, channels_last)
    return postprocess(classes, min_area=min_area, radius=radius)


# ----------------------------------------------------------------------------------------------------------
# A trained model with everything needed to apply it
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferSettings:
    """Tiling and TTA (params section ``infer``)."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int = 8
    tta: bool = False

    def __post_init__(self) -> None:
        _check_ints(self, tile=1, overlap=0, batch_size=1)
        if self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile ({self.tile})")
        if not isinstance(self.tta, bool | np.bool_):
            raise ValueError(f"tta must be true or false, got {self.tta!r}")


@dataclass(frozen=True)
class PostSettings:
    """Post-processing (params section ``post``; :func:`nucleiseg.postprocess.postprocess` defines them)."""

    min_area: int = 20
    radius: int = 1
    method: str = "paper"
    classify: str = "vote"
    mask_threshold: float = 0.5
    marker_threshold: float = 0.3
    marker_min_area: int = 4

    def __post_init__(self) -> None:
        from nucleiseg.postprocess import CLASSIFY, METHODS

        _check_ints(self, min_area=0, radius=0, marker_min_area=0)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.classify not in CLASSIFY:
            raise ValueError(f"classify must be one of {', '.join(CLASSIFY)}, got {self.classify!r}")
        for name, low in (("mask_threshold", 0.0), ("marker_threshold", -1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= 1:
                raise ValueError(f"{name} must be a number in [{low:g}, 1], got {value!r}")

    @property
    def needs_probabilities(self) -> bool:
        from nucleiseg.postprocess import needs_probabilities

        return needs_probabilities(self.method, self.classify)


def _check_ints(settings: Any, **minimum: int) -> None:
    for name, low in minimum.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def settings_from(cls: type, values: Mapping[str, Any] | None) -> Any:
    """:class:`InferSettings` or :class:`PostSettings` from a mapping such as a params section dump; keys the
    settings do not have (``infer.runner``, ``infer.workers``: batch orchestration) are ignored."""
    values = dict(values or {})
    return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass
class Predictor:
    """A trained network plus the preprocessing it was trained with and its default settings.

    ``stain`` is a fitted :class:`nucleiseg.stain.StainNormalizer` (or None) applied to every image before
    the channel normalisation, exactly as in training. ``infer`` and ``post`` are the defaults the model was
    saved with; the methods take overrides. ``mpp``: microns per pixel of the training images (params
    ``model.mpp``); images at another resolution are resampled to it (:mod:`nucleiseg.wsi`). ``backend``: what
    runs the network's forward pass, ``"torch"`` or ``"onnxruntime"`` (``model`` is then a
    :class:`nucleiseg.onnx_model.OnnxNetwork`); everything before and after the logits is the same code.
    """

    model: Any  # torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stain: Any = None  # nucleiseg.stain.StainNormalizer | None
    device: str = "cpu"
    infer: InferSettings = field(default_factory=InferSettings)
    post: PostSettings = field(default_factory=PostSettings)
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    mpp: float = DEFAULT_MODEL_MPP
    backend: str = "torch"

    def stain_transform(self, image: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
        """The fitted stain normalisation of ``image``, as a pixel-wise map to apply region by region (None: no
        stain step). The image's own stain is measured on the whole image, in blocks
        (:func:`nucleiseg.stain.image_normalizer`), so the result equals the tile method on the whole image
        (within one intensity level) in the memory of one block."""
        if self.stain is None:
            return None
        from nucleiseg.stain import image_normalizer

        normalizer = image_normalizer(self.stain, image)
        return None if normalizer is None else normalizer.transform

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The image as the network expects it before channel normalisation (stain-normalised if fitted)."""
        image = _check_image(image)
        transform = self.stain_transform(image)
        return image if transform is None else transform(image)

    def _infer(self, overrides: Mapping[str, Any]) -> InferSettings:
        values = {k: v for k, v in overrides.items() if v is not None}
        return InferSettings(**{**self.infer.__dict__, **values})

    def probabilities(self, image: np.ndarray, dtype: np.dtype | type = np.float32, **infer: Any) -> np.ndarray:
        """Softmax maps ``(5, H, W)``; ``infer`` overrides tile, overlap, batch_size, tta."""
        s = self._infer(infer)
        image = _check_image(image)
        return predict_probabilities(
            self.model, image, self.mean, self.std, s.tile, s.overlap, s.batch_size, s.tta, self.device, dtype,
            transform=self.stain_transform(image),
        )  # fmt: skip

    def classes(self, image: np.ndarray, **infer: Any) -> np.ndarray:
        """Argmax map ``(H, W)`` uint8; ``infer`` overrides tile, overlap, batch_size, tta."""
        s = self._infer(infer)
        image = _check_image(image)
        return predict_classes(
            self.model, image, self.mean, self.std, s.tile, s.overlap, s.batch_size, s.tta, self.device,
            transform=self.stain_transform(image),
        )  # fmt: skip

    def classes_and_probabilities(
        self, image: np.ndarray, dtype: np.dtype | type = np.float16, **infer: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`classes` and :meth:`probabilities` from one network pass."""
        s = self._infer(infer)
        return predict_classes_and_probabilities(
            self.model, self.prepare(image), self.mean, self.std, s.tile, s.overlap, s.batch_size, s.tta,
            self.device, dtype,
        )  # fmt: skip

    def label(
        self,
        image: np.ndarray,
        min_area: int | None = None,
        radius: int | None = None,
        post: PostSettings | None = None,
        **infer: Any,
    ) -> np.ndarray:
        """Nuclei label in the paper's encoding; post-processing settings default to :attr:`post`
        (``min_area`` and ``radius`` override theirs). Only the argmax map is kept when the settings need no
        probabilities (the paper's post-processing), which bounds memory on large images."""
        from dataclasses import replace

        from nucleiseg.postprocess import postprocess

        post = post or self.post
        if min_area is not None or radius is not None:
            post = replace(
                post,
                min_area=post.min_area if min_area is None else min_area,
                radius=post.radius if radius is None else radius,
            )
        if post.needs_probabilities:
            maps = self.probabilities(image, dtype=np.float16, **infer)
        else:
            maps = self.classes(image, **infer)
        return postprocess(maps, **post.__dict__)


def _build_predictor(
    model: Any, extras: Mapping[str, Any], device: str, where: str, source: str, info: dict[str, Any]
) -> Predictor:
    missing = [k for k in ("norm_mean", "norm_std") if extras.get(k) is None]
    if missing:
        raise ModelLoadError(f"{where}: missing {', '.join(missing)} (the channel statistics used in training)")
    try:
        mean_a, std_a = _check_norm(extras["norm_mean"], extras["norm_std"])
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    stain = None
    if extras.get("stain") is not None:
        from nucleiseg.stain import StainError, StainNormalizer

        try:
            stain = StainNormalizer.from_dict(dict(extras["stain"]))
        except (StainError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: bad stain normaliser ({exc})") from None
        if stain.method == "none":
            stain = None
    try:
        infer = settings_from(InferSettings, extras.get("infer"))
        post = settings_from(PostSettings, extras.get("post"))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: bad infer/post settings ({exc})") from None
    mpp = extras.get("mpp")
    if mpp is None:
        warnings.warn(
            f"{where}: no mpp recorded (a model saved before model.mpp existed); assuming {DEFAULT_MODEL_MPP} um/px",
            UserWarning,
            stacklevel=3,
        )
        mpp = DEFAULT_MODEL_MPP
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise ModelLoadError(f"{where}: mpp must be a positive number of microns per pixel, got {extras.get('mpp')!r}")
    import torch

    tensors = (*model.named_parameters(), *model.named_buffers())
    broken = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:  # NaN weights predict background everywhere: a silent "0 nuclei", not an error, without this
        raise ModelLoadError(
            f"{source}: non-finite weights (NaN or infinity) in {len(broken)} tensor(s): {broken[0]} ..."
        )
    model.eval()
    # Converted once here, so that the tiling functions find the format in place and do not switch per image.
    model.to(resolve_device(device), memory_format=torch.channels_last)
    return Predictor(
        model=model,
        mean=tuple(float(v) for v in mean_a),
        std=tuple(float(v) for v in std_a),
        stain=stain,
        device=str(resolve_device(device)),
        infer=infer,
        post=post,
        source=source,
        info=info,
        mpp=mpp,
    )


def is_mlflow_uri(ref: str) -> bool:
    """Whether a model reference is an MLflow URI (models:/, runs:/, or any scheme) rather than a path."""
    return "://" in ref or ref.startswith(("models:/", "runs:/"))


def load_predictor(
    model_ref: str | os.PathLike[str],
    device: str = "auto",
    factory: Callable[..., Any] | None = None,
    backend: str = "torch",
) -> Predictor:
    """Load a trained model as a :class:`Predictor`, from a checkpoint file, an MLflow model or an ONNX file.

    ``backend`` (params ``infer.backend``): ``"torch"``, or ``"onnxruntime"``: the network is exported to ONNX
    in memory on load (:func:`nucleiseg.onnx_model.to_onnxruntime`, no file written; about 10-20 s on 2 cores
    for the ResUNet34) and run by ONNX Runtime on the CPU (``device`` ``"auto"`` means the CPU then).
    An ``.onnx`` file written by ``nucleiseg export onnx`` is a model of its own, always run by ONNX Runtime:
    its metadata holds the entries below (:mod:`nucleiseg.onnx_model`).

    **Checkpoint file** (any path that is a file): a dict written with ``torch.save`` holding only plain
    Python values and tensors (it is read with ``torch.load(weights_only=True)``, so no numpy arrays or
    custom classes):

    ``model_name`` (str)
        The architecture, passed to ``nucleiseg.models.create_model`` (or ``factory``).
    ``model_kwargs`` (dict)
        Keyword arguments for the factory. ``encoder_weights`` is forced to ``"none"`` when the factory
        takes it, since the state dict replaces the pretrained weights (and nothing is downloaded).
    ``state_dict``
        ``model.state_dict()`` of the trained network (loaded strictly).
    ``norm_mean``, ``norm_std`` (3 floats each, 0-1 units)
        Channel statistics of the input normalisation ``(rgb / 255 - mean) / std``.
    ``stain`` (dict or None, optional)
        The fitted stain normaliser, ``StainNormalizer.to_dict()``; None or method ``"none"``: no stain step.
    ``infer`` (dict, optional)
        Default tiling: keys among ``tile``, ``overlap``, ``batch_size``, ``tta``.
    ``post`` (dict, optional)
        Default post-processing: keys of :class:`PostSettings` (``min_area``, ``radius``, ``method``, ...).
    ``mpp`` (float, optional)
        Microns per pixel of the training images; absent in models saved before it existed: 0.25, with a warning.

    Other keys (``epoch``, metrics, params) are kept in :attr:`Predictor.info`.

    **MLflow model** (``models:/nucleiseg@champion``, ``runs:/<id>/model``, any URI with a scheme, or a
    local MLflow model folder holding an ``MLmodel`` file). The format training logs
    (:mod:`nucleiseg.mlflow_model`, a pyfunc model) holds the state dict as ``artifacts/weights.safetensors`` and
    the entries above as ``artifacts/config.json``; they are read with the installed nucleiseg, unpickling
    nothing and running no code from the store. The older format, a pickled ``nn.Module``
    (``mlflow.pytorch.log_model(..., serialization_format="pickle", metadata={...})`` with the entries above in
    the MLmodel file's ``metadata``), is still read, with a :class:`PickledModelWarning`: unpickling runs the
    code the pickle holds. The tracking / registry URI must be set beforehand for ``models:/`` and ``runs:/``
    URIs (``mlflow.set_tracking_uri``).

    Raises :class:`ModelLoadError` naming the reference and the problem.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ref = os.fspath(model_ref)
    path = Path(ref)
    if backend == "onnxruntime" and device == "auto":
        device = "cpu"  # not CUDA when present: ONNX Runtime's CPU provider runs the network
    if not is_mlflow_uri(ref) and path.is_file() and path.suffix.lower() == ".onnx":
        return _load_onnx(path, device)
    predictor: Predictor | None = None
    if not is_mlflow_uri(ref) and path.is_file():
        predictor = _load_checkpoint(path, device, factory)
    elif is_mlflow_uri(ref) or (path.is_dir() and (path / "MLmodel").is_file()):
        predictor = _load_mlflow(ref, device)
    if predictor is not None:
        return predictor if backend == "torch" else _with_onnxruntime(predictor)
    if path.is_dir():
        raise ModelLoadError(f"{ref}: a folder without an MLmodel file is not a model")
    raise ModelLoadError(f"{ref}: model not found (expected a checkpoint file or an MLflow model URI)")


def _with_onnxruntime(predictor: Predictor) -> Predictor:
    from nucleiseg.onnx_model import OnnxModelError, to_onnxruntime

    try:
        return to_onnxruntime(predictor)
    except OnnxModelError as exc:
        raise ModelLoadError(f"{predictor.source}: backend onnxruntime: {exc}") from None


def _load_onnx(path: Path, device: str) -> Predictor:
    """A predictor from an ONNX file written by ``nucleiseg export onnx``: the network run by ONNX Runtime, the
    rest (normalisation, stain, settings, mpp) from the file's metadata."""
    from dataclasses import replace

    from nucleiseg.onnx_model import OnnxModelError, OnnxNetwork, non_finite_initializers

    if resolve_device(device).type != "cpu":
        raise ModelLoadError(f"{path}: an ONNX model runs on the CPU (ONNX Runtime's CPU provider), not {device}")
    try:
        network = OnnxNetwork(path)
        broken = non_finite_initializers(path)
    except OnnxModelError as exc:
        raise ModelLoadError(str(exc)) from None
    if broken:  # as the torch backend: NaN weights would predict background everywhere, silently
        raise ModelLoadError(
            f"{path}: non-finite weights (NaN or infinity) in {len(broken)} tensor(s): {broken[0]} ..."
        )
    if not network.metadata:
        raise ModelLoadError(
            f"{path}: no nucleiseg metadata (norm_mean, norm_std, ...); write it with nucleiseg export onnx"
        )
    info = {k: v for k, v in network.metadata.items() if k != "stain"}
    predictor = _build_predictor(network, network.metadata, "cpu", f"{path} (metadata)", str(path), info)
    return replace(predictor, backend="onnxruntime")


def _load_checkpoint(path: Path, device: str, factory: Callable[..., Any] | None) -> Predictor:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, EOF) for bad files
        raise ModelLoadError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise ModelLoadError(f"{path}: a checkpoint must be a dict, got {type(ckpt).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks {', '.join(missing)}")
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "stain")}
    return predictor_from_state_dict(ckpt["state_dict"], ckpt, device, str(path), info, factory)


def predictor_from_state_dict(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    device: str = "auto",
    source: str = "",
    info: dict[str, Any] | None = None,
    factory: Callable[..., Any] | None = None,
) -> Predictor:
    """A :class:`Predictor` from a plain state dict (tensors by name) and the other entries of the checkpoint
    contract of :func:`load_predictor` (``model_name``, ``model_kwargs``, ``norm_mean``, ``norm_std``, optional
    ``stain``, ``infer``, ``post``, ``mpp``): the network is rebuilt by ``factory`` (default
    ``nucleiseg.models.create_model``) and its weights loaded strictly. ``source`` names the model in errors."""
    import inspect

    missing = [k for k in ("model_name", "model_kwargs") if k not in config]
    if missing:
        raise ModelLoadError(f"{source}: lacks {', '.join(missing)}")
    if factory is None:
        from nucleiseg.models import create_model as factory
    kwargs = dict(config["model_kwargs"] or {})
    name = kwargs.pop("name", None) or config["model_name"]  # the trainer's model_spec also records the name
    if name != config["model_name"]:
        raise ModelLoadError(f"{source}: model_name {config['model_name']!r} and model_kwargs name {name!r} differ")
    try:
        if "encoder_weights" in inspect.signature(factory).parameters:
            kwargs["encoder_weights"] = "none"  # the trained weights replace them; never download
    except (TypeError, ValueError):  # builtins or C callables without a signature
        pass
    try:
        model = factory(name, **kwargs)
        model.load_state_dict(state_dict, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{source}: cannot rebuild model {config['model_name']!r} ({exc})") from None
    return _build_predictor(model, config, device, source, source, dict(info or {}))


class PickledModelWarning(UserWarning):
    """A model of the old MLflow format was loaded: its network is a pickle, which runs whatever code it holds."""


def _load_mlflow(uri: str, device: str) -> Predictor:
    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch

    torch_device = resolve_device(device)
    folder = Path(uri)
    local = not is_mlflow_uri(uri) and (folder / "MLmodel").is_file()
    try:
        if local:
            # A local folder: read its MLmodel file directly. get_model_info would look its logged-model id up in
            # the tracking store (MLflow's default creates ./mlflow.db) and fail for a copied folder.
            info = mlflow.models.Model.load(folder / "MLmodel")
        else:
            info = mlflow.models.get_model_info(uri)
    except Exception as exc:  # MLflow raises many types for a missing model or an unreachable store
        raise ModelLoadError(f"{uri}: cannot load the MLflow model ({type(exc).__name__}: {exc})") from None
    record = {"run_id": info.run_id, "model_uri": uri, "model_uuid": info.model_uuid}
    from nucleiseg import mlflow_model

    if mlflow_model.is_pyfunc_model(info.flavors):  # the current format: safetensors weights and a JSON config
        if local:
            return mlflow_model.predictor_from_folder(folder, device, uri, record)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                root = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            except Exception as exc:  # as above, for the artifact store
                raise ModelLoadError(f"{uri}: cannot download the MLflow model ({type(exc).__name__}: {exc})") from None
            return mlflow_model.predictor_from_folder(root, device, uri, record)
    # The format before nucleiseg.mlflow_model: a pickled nn.Module (mlflow.pytorch), still read, with a warning.
    try:
        warnings.warn(
            f"{uri}: an MLflow model is a pickle, and loading it runs the code it holds; load only models from a "
            "registry and artifact store you trust (README, Safety)",
            PickledModelWarning,
            stacklevel=3,
        )
        model = mlflow.pytorch.load_model(uri, map_location=torch_device)
    except Exception as exc:  # MLflow, torch and pickle raise many types for a missing or corrupt model
        raise ModelLoadError(f"{uri}: cannot load the MLflow model ({type(exc).__name__}: {exc})") from None
    try:
        model.eval()
    except NotImplementedError:
        # torch.export programs (MLflow's default "pt2" format) fix the traced batch size and have no eval mode.
        raise ModelLoadError(
            f"{uri}: the model was logged as a torch.export program (MLflow serialization_format='pt2'), which "
            "fixes its input shape; log it with mlflow.pytorch.log_model(..., serialization_format='pickle')"
        ) from None
    metadata = dict(info.metadata or {})
    record = {**{k: v for k, v in metadata.items() if k != "stain"}, **record}
    return _build_predictor(model, metadata, device, f"{uri} (metadata)", uri, record)


def model_identity(predictor: Predictor) -> str:
    """What a predictor's outputs were computed with, to tell whether earlier outputs can be reused: a
    checkpoint's content (SHA-256), or an MLflow model's ``model_uuid`` (unique to each saved model, whatever URI
    or alias reached it)."""
    from nucleiseg.outputs import file_sha256

    if predictor.info.get("model_uuid"):
        identity = f"mlflow:{predictor.info['model_uuid']}"
    else:
        identity = f"sha256:{file_sha256(predictor.source)}"
    # A torch model run by ONNX Runtime gives outputs that may differ by rounding: not the torch outputs' identity.
    exported = predictor.backend == "onnxruntime" and not predictor.source.lower().endswith(".onnx")
    return f"{identity}+onnxruntime" if exported else identity


# ----------------------------------------------------------------------------------------------------------
# Files in, outputs out
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    """What happened to one input: ``status`` is ``"ok"`` or ``"failed"`` (``error`` says why)."""

    input: str
    name: str
    status: Literal["ok", "failed"]
    error: str | None = None
    nuclei: int = 0
    tumor: int = 0
    lymphocyte: int = 0
    stroma: int = 0
    height: int = 0
    width: int = 0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[FileResult]]:
    """Image files from a mix of files and folders (folders: :func:`nucleiseg.io.list_images`).

    Returns the files, in the order given (folders sorted), and a failed :class:`FileResult` for every input
    that is neither (missing path, folder without images).
    """
    from nucleiseg.io import IMAGE_SUFFIXES, list_images

    files: list[Path] = []
    problems: list[FileResult] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                problems.append(FileResult(str(p), p.name, "failed", f"{p}: no images ({', '.join(IMAGE_SUFFIXES)})"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(FileResult(str(p), p.stem, "failed", f"{p}: no such file or folder"))
    return files, problems


def predict_file(
    predictor: Predictor,
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    infer: InferSettings | None = None,
    post: PostSettings | None = None,
    name: str | None = None,
    mpp: float | None = None,
    mpp_tolerance: float = 0.02,
    geojson_objects: str = "detection",
) -> FileResult:
    """Segment one image file and write its four outputs into ``out_dir``
    (:func:`nucleiseg.export.write_outputs`). Settings default to the predictor's.

    ``mpp``: the image's microns per pixel. When it differs from the model's by more than ``mpp_tolerance``
    (relative), the image is resampled to the model's resolution for the network (:func:`nucleiseg.wsi.rescale`)
    and the label brought back to the image's pixels (nearest neighbour); the measurements use ``mpp``. The
    softmax maps are held in float16 (10 bytes per pixel) for the class probabilities of the table (left empty
    for a resampled image).

    Raises :class:`nucleiseg.io.ImageReadError` for an unreadable image and whatever inference or writing
    raises; :func:`predict_files` turns those into failed results. ``geojson_objects``: QuPath object type of the
    GeoJSON's nuclei (``detection``, or ``annotation`` to correct them in QuPath).
    """
    from nucleiseg.export import write_outputs
    from nucleiseg.io import read_image
    from nucleiseg.measure import stain_matrix_of
    from nucleiseg.postprocess import postprocess
    from nucleiseg.wsi import rescale, resize_label

    infer = infer or predictor.infer
    post = post or predictor.post
    path = Path(path)
    name = name or path.stem
    started = time.perf_counter()
    image = read_image(path)
    seen = image if mpp is None else rescale(image, mpp, predictor.mpp, mpp_tolerance)
    # One network pass gives the label and the softmax maps (float16) for the table's class probabilities.
    classes, probs = predictor.classes_and_probabilities(
        seen, tile=infer.tile, overlap=infer.overlap, batch_size=infer.batch_size, tta=infer.tta
    )
    label = postprocess(probs if post.needs_probabilities else classes, **post.__dict__)
    del classes
    if seen is not image:  # the maps are at the model's scale: no class probabilities on the image's pixels
        label, probs = resize_label(label, image.shape[:2]), None
    del seen
    # Measured in the image's own pixels (at the model's scale when the image's is not given), with the stain
    # vectors the model was trained with.
    image_mpp = predictor.mpp if mpp is None else mpp
    outputs = write_outputs(
        out_dir,
        name,
        image,
        label,
        mpp=image_mpp,
        probs=probs,
        stain_matrix=stain_matrix_of(predictor.stain),
        geojson_objects=geojson_objects,
    )
    del probs
    ids = np.flatnonzero(np.bincount(label.ravel()))  # present ids without sorting the whole image
    ids = ids[ids > 0]
    per_class = np.bincount(ids % 3, minlength=3)
    return FileResult(
        input=str(path),
        name=name,
        status="ok",
        nuclei=len(ids),
        tumor=int(per_class[0]),
        lymphocyte=int(per_class[1]),
        stroma=int(per_class[2]),
        height=image.shape[0],
        width=image.shape[1],
        seconds=round(time.perf_counter() - started, 3),
        outputs={k: str(v) for k, v in outputs.items()},
    )


def predict_files(
    predictor: Predictor,
    paths: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    infer: InferSettings | None = None,
    post: PostSettings | None = None,
    on_result: Callable[[FileResult], None] | None = None,
    mpp: float | None = None,
    mpp_tolerance: float = 0.02,
    geojson_objects: str = "detection",
) -> list[FileResult]:
    """:func:`predict_file` on every path (all at ``mpp``); a failure is recorded and the others go on.

    Two inputs with the same file stem would write the same outputs: the later one fails with a message
    naming both instead of overwriting. ``on_result`` is called after each file (progress reporting).
    """
    results: list[FileResult] = []
    used: dict[str, str] = {}
    for item in paths:
        path = Path(item)
        name = path.stem
        started = time.perf_counter()
        if name in used:
            result = FileResult(str(path), name, "failed", f"{path}: output name {name!r} already used by {used[name]}")
        else:
            try:
                result = predict_file(predictor, path, out_dir, infer, post, name, mpp, mpp_tolerance, geojson_objects)
                used[name] = str(path)
            except Exception as exc:  # one bad image must not stop the batch; the error is reported
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                result = FileResult(
                    str(path), name, "failed", f"{type(exc).__name__}: {message}",
                    seconds=round(time.perf_counter() - started, 3),
                )  # fmt: skip
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def summarize(results: Sequence[FileResult], **extra: Any) -> dict[str, Any]:
    """A JSON-able summary of a batch: counts, and every input's result; ``extra`` is added at the top."""
    ok = [r for r in results if r.status == "ok"]
    return {
        **extra,
        "inputs": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "nuclei": sum(r.nuclei for r in ok),
        "results": [r.as_dict() for r in results],
    }


__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "AxisTile",
    "FileResult",
    "InferSettings",
    "ModelLoadError",
    "PickledModelWarning",
    "PostSettings",
    "Predictor",
    "axis_tiles",
    "expand_inputs",
    "is_mlflow_uri",
    "iter_tile_probabilities",
    "load_predictor",
    "model_identity",
    "predict_classes",
    "predict_classes_and_probabilities",
    "predict_file",
    "predict_files",
    "predict_label",
    "predict_probabilities",
    "reflect_indices",
    "resolve_device",
    "settings_from",
    "summarize",
]
