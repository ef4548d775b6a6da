"""Synthetic H&E tiles with nucleus labels: the embedded default dataset.

A tile imitates a 40x (about 0.25 µm/px) field of colorectal adenocarcinoma, the tissue of CoNSeP, so that the
whole pipeline can be trained, tested and demonstrated without downloads, and a model trained on it meets the
same problems as on real slides: crowded touching nuclei, three classes told apart by size, shape and chromatin,
and stain variation.

How a tile is made
------------------
1. **Composition.** The number of nuclei is drawn around ``density`` (nuclei per 1000x1000 px) and split into
   tumor / lymphocyte / stroma around ``class_fractions`` (per-tile Dirichlet variation, as real tiles vary).
2. **Tissue layout.** Tumor glands (an epithelial band around a white lumen) and solid nests, sized to hold the
   tumor nuclei at ``tumor_packing``; stroma everywhere else, with white spaces; an eosin fibre direction field
   that drifts smoothly and wraps around the glands.
3. **Nuclei.** Shapes are drawn one by one at positions sampled from class-specific tissue maps:
   tumor: large (median ``areas[0]``), irregular star-shaped outlines, oriented across the epithelial band,
   crowded in the glands; lymphocyte: small, round (median ``areas[1]``), scattered in the stroma and gathered in
   aggregates; stroma: spindles (aspect about 4, 2.8 to 7; median area ``areas[2]``) aligned with the local
   fibre direction.
   A nucleus may overlap earlier ones a little and is drawn over them, which makes touching neighbours with a
   shared border. Afterwards every id keeps only its largest 4-connected piece and is dropped when less than
   half of it survives, so each id is one connected component.
4. **Colour** (Beer-Lambert): haematoxylin and eosin concentration maps (``H``, ``E``) give the optical density
   ``OD = H * h + E * e`` per RGB channel (``h``, ``e``: stain vectors fitted on the CoNSeP class means and
   perturbed per tile), and ``I = 255 * exp(-OD)``. Nuclei carry haematoxylin with a class-specific chromatin
   pattern (tumor: pale vesicular nucleoplasm, chromatin rim and clumps, nucleoli; lymphocyte: dense and dark;
   stroma: dark, fine grain); the background carries eosin with oriented fibre texture, epithelial cytoplasm,
   lumens, white spaces and small vessels with red blood cells (a third absorber). Optical blur and sensor
   noise come last.

Label encoding: 0 background; ids 3, 6, 9... tumor, 1, 4, 7... lymphocytes, 2, 5, 8... stroma (``id % 3``).
Tiles are deterministic for a seed; in :func:`write_dataset`, tile ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft, ndimage

TUMOR, LYMPHOCYTE, STROMA = 0, 1, 2

# CoNSeP training tiles: 5,537 tumor, 3,941 lymphocyte, 5,706 stroma nuclei over 27 tiles of 1000x1000.
DEFAULT_CLASS_FRACTIONS: tuple[float, float, float] = (0.365, 0.26, 0.375)
DEFAULT_DENSITY = 560.0  # nuclei per 1000x1000 px
# Median nucleus areas in px at 40x (CoNSeP: 347 tumor, 184 lymphocyte, 184 stroma).
DEFAULT_AREAS: tuple[float, float, float] = (350.0, 180.0, 190.0)

# Optical-density stain vectors (R, G, B), fitted so that stroma background, tumor and lymphocyte nuclei of
# CoNSeP come out at their mean colours (about (220, 188, 221), (168, 128, 196) and (122, 86, 160)).
H_VECTOR = np.array([0.565, 0.774, 0.288])
E_VECTOR = np.array([0.280, 0.840, 0.460])
# Red blood cells (haemoglobin and eosin): the orange-red of erythrocytes in H&E, a third absorber.
RBC_VECTOR = np.array([0.13, 0.72, 0.66])


# ----------------------------------------------------------------------------------------------------------
# Random fields
# ----------------------------------------------------------------------------------------------------------


def _freqs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return fft.fftfreq(shape[0]).astype(np.float32)[:, None], fft.rfftfreq(shape[1]).astype(np.float32)[None, :]


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit standard deviation.

    Smooth fields (large ``sigma``) are made on a coarser grid and resized, which is much cheaper.
    """
    factor = max(1, int(sigma // 3))
    coarse = (-(-shape[0] // factor) + 1, -(-shape[1] // factor) + 1) if factor > 1 else shape
    values = _blur(rng.standard_normal(coarse, dtype=np.float32), sigma / factor)
    return _standardise(_upsample(values, factor, shape))


def _upsample(values: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """``values`` of a grid ``factor`` times coarser, resized bilinearly and cropped to ``shape``."""
    if factor == 1:
        return values
    import cv2

    size = (values.shape[1] * factor, values.shape[0] * factor)  # OpenCV sizes are (width, height)
    return cv2.resize(values, size, interpolation=cv2.INTER_LINEAR)[: shape[0], : shape[1]]


def _standardise(values: np.ndarray) -> np.ndarray:
    values -= values.mean()
    values /= values.std() + np.float32(1e-8)
    return values


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 image (edges reflected)."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _oriented_noise(
    rng: np.random.Generator,
    angle: np.ndarray,
    scales: Sequence[tuple[float, float, float]],
    n_angles: int = 8,
) -> np.ndarray:
    """Streaky texture whose streaks follow ``angle`` (radians, image x right / y down) at every pixel.

    White noise is filtered by a bank of anisotropic Gaussians (``scales``: ``(sigma_along, sigma_across,
    weight)`` summed) at ``n_angles`` orientations, in the Fourier domain; each pixel interpolates between the
    two orientations nearest to its own. Coarse textures are made on a coarser grid. Unit standard deviation.
    """
    factor = max(1, int(min(s[1] for s in scales) // 2))
    shape = angle.shape
    grid_angle = angle[::factor, ::factor]
    grid = grid_angle.shape
    spectrum = fft.rfft2(rng.standard_normal(grid, dtype=np.float32))
    fy, fx = _freqs(grid)
    c = np.float32(-2 * math.pi**2 / factor**2)
    bank = np.empty((n_angles, *grid), np.float32)
    for k in range(n_angles):
        a = k * math.pi / n_angles
        along2 = (fx * np.float32(math.cos(a)) + fy * np.float32(math.sin(a))) ** 2
        across2 = (fy * np.float32(math.cos(a)) - fx * np.float32(math.sin(a))) ** 2
        gain = np.zeros(spectrum.shape, np.float32)
        for sigma_along, sigma_across, weight in scales:
            gain += np.float32(weight) * np.exp(c * (sigma_along**2 * along2 + sigma_across**2 * across2))
        bank[k] = fft.irfft2(spectrum * gain, s=grid)
    bank /= bank.std() + np.float32(1e-8)
    position = np.mod(grid_angle, math.pi) * np.float32(n_angles / math.pi)
    k0 = np.minimum(position.astype(np.intp), n_angles - 1)
    t = position - k0
    r0 = np.take_along_axis(bank, k0[None], 0)[0]
    r1 = np.take_along_axis(bank, ((k0 + 1) % n_angles)[None], 0)[0]
    return _upsample((1 - t) * r0 + t * r1, factor, shape)


def _sample_positions(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` (y, x) positions drawn with probability proportional to ``weight``, jittered within the pixel."""
    cdf = np.cumsum(weight, dtype=np.float64).ravel()
    if n <= 0 or cdf[-1] <= 0:
        return np.empty((0, 2))
    flat = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), cdf.size - 1)
    yx = np.stack(np.unravel_index(flat, weight.shape), axis=1).astype(np.float64)
    return yx + rng.uniform(-0.5, 0.5, size=yx.shape)


# ----------------------------------------------------------------------------------------------------------
# Tissue layout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Tissue:
    epithelium: np.ndarray  # bool: epithelial band of glands and nests (tumor cells)
    lumen: np.ndarray  # bool: gland lumens (white, maybe secretion)
    basal: np.ndarray  # float: 0 at the basement membrane, 1 at the lumen, inside the epithelium
    normal: np.ndarray  # float: radians, direction across the epithelial band (basement -> outside)
    space: np.ndarray  # float 0..1: white space in the stroma
    fibre_angle: np.ndarray  # float: radians, local direction of the eosin fibres
    secretion: np.ndarray  # float 0..1: eosinophilic secretion in lumens
    blood: np.ndarray  # float 0..1: red blood cells in small vessels


_GLAND_HARMONICS = ((2, 0.07), (3, 0.05), (4, 0.03), (5, 0.02))


def _gland_coords(
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    cy: float,
    cx: float,
    psi: float,
    aspect: float,
    harmonics: list[tuple[int, float, float]],
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equivalent radius ``q``, polar angle, rotated coordinates and outline modulation over a gland's box."""
    dy = np.arange(y0, y1, step, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, step, dtype=np.float32)[None, :] - cx
    u = dx * math.cos(psi) + dy * math.sin(psi)
    v = -dx * math.sin(psi) + dy * math.cos(psi)
    su, sv = u / math.sqrt(aspect), v * math.sqrt(aspect)
    phi = np.arctan2(sv, su)
    outline = np.ones_like(phi)
    for k, amp, phase in harmonics:
        outline += amp * np.cos(k * phi + phase)
    return np.hypot(su, sv), phi, u, v, outline


def _glands(rng: np.random.Generator, shape: tuple[int, int], area_needed: float) -> dict[str, np.ndarray]:
    """Glands (epithelial ring round a lumen) and solid nests until their in-tile epithelium reaches the area."""
    h, w = shape
    epithelium = np.zeros(shape, bool)
    lumen = np.zeros(shape, bool)
    basal = np.zeros(shape, np.float32)
    normal = np.zeros(shape, np.float32)
    achieved = 0.0
    for _ in range(120):
        if achieved >= area_needed:
            break
        remaining = area_needed - achieved
        thickness = rng.uniform(22.0, 40.0)
        radius = rng.uniform(55.0, 125.0)
        if math.pi * (radius**2 - (radius - thickness) ** 2) > 1.2 * remaining:
            # Shrink the ring to the epithelium still needed: pi (r^2 - (r - T)^2) = remaining.
            radius = (remaining / math.pi + thickness**2) / (2 * thickness)
        solid = rng.random() < 0.25 or radius < thickness + 12
        if solid:
            radius = float(np.clip(math.sqrt(remaining / math.pi) * rng.uniform(0.9, 1.2), 14.0, 90.0))
        aspect = rng.uniform(1.0, 1.9)
        extent = radius * math.sqrt(aspect) * 1.3 + 12
        cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
        y0, y1 = max(0, int(cy - extent)), min(h, int(cy + extent) + 1)
        x0, x1 = max(0, int(cx - extent)), min(w, int(cx + extent) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        psi = rng.uniform(0, math.pi)
        harmonics = [(k, rng.normal(0, amp), rng.uniform(0, 2 * math.pi)) for k, amp in _GLAND_HARMONICS]
        # Keep a stromal gap of about 8 px between glands (checked on every 4th pixel first: cheap).
        taken = epithelium[y0:y1, x0:x1] | lumen[y0:y1, x0:x1]
        if taken.any():
            coarse = taken[::4, ::4]
            q, _, _, _, _ = _gland_coords(y0, y1, x0, x1, cy, cx, psi, aspect, harmonics, step=4)
            if np.any(coarse & (q < radius + 12)):
                continue
        q, phi, u, v, outline = _gland_coords(y0, y1, x0, x1, cy, cx, psi, aspect, harmonics)
        outer = q < radius * outline
        if not outer.any() or np.any(taken & (q < radius * outline + 8)):
            continue
        if solid:
            inner = np.zeros_like(outer)
            depth = np.clip((radius * outline - q) / max(radius, 1.0), 0, 1)
        else:
            band = thickness * (1 + 0.15 * np.cos(2 * phi + rng.uniform(0, 2 * math.pi)))
            inner = q < radius * outline - band
            depth = np.clip((radius * outline - q) / band, 0, 1)
        # Normal to the equivalent-radius level sets, back in image coordinates.
        across = np.arctan2(v * aspect, u / aspect) + psi
        band_mask = outer & ~inner
        epithelium[y0:y1, x0:x1] |= band_mask
        lumen[y0:y1, x0:x1] |= outer & inner
        basal[y0:y1, x0:x1] = np.where(band_mask, depth, basal[y0:y1, x0:x1])
        normal[y0:y1, x0:x1] = np.where(outer, across, normal[y0:y1, x0:x1])
        achieved += float(band_mask.sum())
    return {"epithelium": epithelium, "lumen": lumen, "basal": basal, "normal": normal}


def _vessels(
    rng: np.random.Generator, stroma: np.ndarray, fibre_angle: np.ndarray, space: np.ndarray, blood: np.ndarray
) -> None:
    """Small vessels along the fibres: a white lumen (added to ``space``) packed with red blood cells."""
    h, w = stroma.shape
    for cy, cx in _sample_positions(rng, stroma.astype(np.float32), rng.poisson(0.8 * h * w / 512**2)):
        angle = float(fibre_angle[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))])
        half_length, half_width = rng.uniform(15, 45), rng.uniform(4, 8)
        reach = half_length + 6
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        inside = (u / half_length) ** 2 + (v / half_width) ** 2
        space[y0:y1, x0:x1] = np.maximum(space[y0:y1, x0:x1], np.clip(1.5 - inside, 0, 1))
        n_cells = int(rng.uniform(0.2, 0.9) * half_length * half_width / 8)
        if n_cells == 0:
            continue
        t = rng.uniform(-0.85, 0.85, n_cells)
        cu = t * half_length
        cv = rng.uniform(-1, 1, n_cells) * half_width * np.sqrt(1 - t**2) * 0.7
        py = cy + cu * math.sin(angle) + cv * math.cos(angle)
        px = cx + cu * math.cos(angle) - cv * math.sin(angle)
        radius = rng.uniform(3.0, 4.0, n_cells)
        d = np.sqrt((dy[..., None] + cy - py) ** 2 + (dx[..., None] + cx - px) ** 2)
        # Biconcave discs: full inside the rim, paler in the centre.
        cells = np.clip(radius - d + 0.5, 0, 1) * (1 - 0.35 * np.exp(-(d**2) / 2.0))
        blood[y0:y1, x0:x1] = np.maximum(blood[y0:y1, x0:x1], cells.max(axis=-1))


def _tissue(rng: np.random.Generator, shape: tuple[int, int], epithelium_area: float, white_space: float) -> _Tissue:
    glands = _glands(rng, shape, epithelium_area)
    gland = glands["epithelium"] | glands["lumen"]

    # Fibres drift smoothly and wrap tangentially around glands; angles are blended as doubled-angle vectors.
    drift = rng.uniform(0, math.pi) + 0.5 * _noise(rng, shape, 0.35 * min(shape)) + 0.25 * _noise(rng, shape, 20.0)
    c2, s2 = np.cos(2 * drift), np.sin(2 * drift)
    if gland.any():
        # The distance to the glands grows along their outward normal; fibres run across that gradient.
        distance = ndimage.distance_transform_edt(~gland).astype(np.float32)
        gy, gx = np.gradient(_blur(distance, 3.0))
        tangent = np.arctan2(gy, gx) + math.pi / 2
        pull = np.exp(-distance / 40.0)
        c2 = (1 - pull) * c2 + pull * np.cos(2 * tangent)
        s2 = (1 - pull) * s2 + pull * np.sin(2 * tangent)
    fibre_angle = (0.5 * np.arctan2(s2, c2)).astype(np.float32)

    # White space: loose stroma and tears, a share ``white_space`` of the stroma, with soft edges.
    loose = _oriented_noise(rng, fibre_angle, [(24.0, 5.0, 1.0)]) + 0.6 * _noise(rng, shape, 6.0)
    stroma = ~gland
    if stroma.any() and white_space > 0:
        threshold = np.quantile(loose[stroma], 1 - white_space)
        space = 1 / (1 + np.exp(-(loose - threshold) / 0.2))
    else:
        space = np.zeros(shape, np.float32)
    space = np.where(stroma, space, 0).astype(np.float32)
    blood = np.zeros(shape, np.float32)
    if stroma.any():
        _vessels(rng, stroma, fibre_angle, space, blood)
    secretion = np.clip(_noise(rng, shape, 6.0) - 0.6, 0, None) * (rng.random() < 0.6)
    return _Tissue(
        epithelium=glands["epithelium"],
        lumen=glands["lumen"],
        basal=glands["basal"],
        normal=glands["normal"],
        space=space,
        fibre_angle=fibre_angle,
        secretion=np.where(glands["lumen"], secretion, 0).astype(np.float32),
        blood=blood,
    )


# ----------------------------------------------------------------------------------------------------------
# Nuclei
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    cls: int
    a: float  # semi-major axis, px
    b: float  # semi-minor axis, px
    angle: float  # direction of the major axis, radians
    harmonics: np.ndarray  # outline modulation amplitudes for k = 2..5 (star-shaped outlines)
    phases: np.ndarray
    spindle: bool = False
    taper: float = 0.5  # spindle half-width profile (1 - t^2)^taper
    bend: float = 0.0  # spindle curvature, in units of b


def _sample_shape(rng: np.random.Generator, cls: int, median_area: float, angle: float) -> _Shape:
    """Outline of one nucleus of class ``cls``, its major axis along ``angle``.

    Tumor areas are drawn 12% above the median asked for: overlaps and the tile edge trim the large tumor
    nuclei most (calibrated so that the kept nuclei of 512x512 tiles have the median asked for).
    """
    phases = rng.uniform(0, 2 * math.pi, 4)
    if cls == TUMOR:
        area = 1.12 * median_area * math.exp(rng.normal(0, 0.42))
        aspect = 1 + min(math.exp(rng.normal(math.log(0.55), 0.45)), 1.6)
        harmonics = rng.normal(0, 1, 4) * np.array([0.09, 0.08, 0.05, 0.035])
    elif cls == LYMPHOCYTE:
        area = median_area * math.exp(rng.normal(0, 0.2))
        aspect = 1 + abs(rng.normal(0, 0.1))
        harmonics = rng.normal(0, 1, 4) * np.array([0.03, 0.02, 0.012, 0.0])
    else:
        area = median_area * math.exp(rng.normal(0, 0.38))
        aspect = float(np.clip(math.exp(rng.normal(math.log(4.0), 0.22)), 2.8, 7.0))
        taper = rng.uniform(0.45, 0.85)
        # Area of |v| < b (1 - (u/a)^2)^taper is 2ab * B(1/2, taper + 1).
        beta = math.exp(math.lgamma(0.5) + math.lgamma(taper + 1) - math.lgamma(taper + 1.5))
        a = math.sqrt(area * aspect / (2 * beta))
        return _Shape(cls, a, a / aspect, angle, np.zeros(4), phases, True, taper, rng.normal(0, 0.6))
    area = float(np.clip(area, 60, 2000))
    correction = 1 + 0.5 * float(np.sum(harmonics**2))
    a = math.sqrt(area * aspect / (math.pi * correction))
    return _Shape(cls, a, a / aspect, angle, harmonics, phases)


def _rasterize(shape: _Shape, cy: float, cx: float, tile: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """Boolean mask of the nucleus clipped to the tile, with its top-left corner; None when off the tile."""
    reach = shape.a * (1 + float(np.abs(shape.harmonics).sum())) + 2
    y0, y1 = max(0, int(cy - reach)), min(tile[0], int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(tile[1], int(cx + reach) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    if shape.spindle:
        t = u / shape.a
        half_width = shape.b * np.clip(1 - t * t, 0, None) ** shape.taper
        mask = np.abs(v - shape.bend * shape.b * t * t) < half_width
    else:
        un, vn = u / shape.a, v / shape.b
        phi = np.arctan2(vn, un)
        outline = np.ones_like(phi)
        for k, (amp, ph) in enumerate(zip(shape.harmonics, shape.phases, strict=True), start=2):
            if amp:
                outline += amp * np.cos(k * phi + ph)
        mask = np.hypot(un, vn) < outline
    return mask, y0, x0


@dataclass
class _Canvas:
    """The instance map being drawn (ids 1, 2, ... in drawing order) and what is known of each nucleus."""

    label: np.ndarray
    shapes: list[_Shape] = field(default_factory=list)
    centres: list[tuple[float, float]] = field(default_factory=list)
    drawn: list[int] = field(default_factory=lambda: [0])  # area as drawn, by id (0: background)
    visible: list[int] = field(default_factory=lambda: [0])  # area still uncovered, by id

    def place(
        self,
        rng: np.random.Generator,
        cls: int,
        count: int,
        weight: np.ndarray,
        median_area: float,
        orientation: np.ndarray | None = None,
        orientation_jitter: float = 0.0,
        max_overlap: float = 0.1,
    ) -> None:
        """Draw ``count`` nuclei of one class at positions sampled from ``weight``.

        The major axis follows ``orientation`` (radians per pixel; None: random) give or take
        ``orientation_jitter``. A candidate is rejected when more than ``max_overlap`` of it covers earlier
        nuclei or when it would cover more than a quarter of an earlier nucleus; an accepted one is drawn over
        the earlier ones, which then share a border with it.
        """
        label = self.label
        accepted = 0
        for cy, cx in _sample_positions(rng, weight, 6 * count + 20 if count > 0 else 0):
            if accepted >= count:
                break
            iy, ix = min(max(round(cy), 0), label.shape[0] - 1), min(max(round(cx), 0), label.shape[1] - 1)
            if label[iy, ix]:
                continue  # centred on an earlier nucleus: would overlap it too much, skip without drawing
            base = float(orientation[iy, ix]) if orientation is not None else rng.uniform(0, math.pi)
            shape = _sample_shape(rng, cls, median_area, base + rng.normal(0, orientation_jitter))
            raster = _rasterize(shape, cy, cx, label.shape)
            if raster is None:
                continue
            mask, y0, x0 = raster
            n_pixels = int(mask.sum())
            if n_pixels < 20:
                continue
            window = label[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            under = window[mask]
            covered = under[under > 0]
            if covered.size > max_overlap * n_pixels:
                continue
            if covered.size:
                ids, overlaps = np.unique(covered, return_counts=True)
                if np.any(overlaps > 0.25 * np.asarray([self.visible[i] for i in ids])):
                    continue
                for i, n in zip(ids, overlaps, strict=True):
                    self.visible[i] -= int(n)
            window[mask] = len(self.shapes) + 1
            self.shapes.append(shape)
            self.centres.append((cy, cx))
            self.drawn.append(n_pixels)
            self.visible.append(n_pixels)
            accepted += 1


def _keep_connected(label: np.ndarray, drawn_area: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """Keep each id's largest 4-connected piece; drop ids left with less than ``min_fraction`` of their area."""
    from skimage.measure import label as connected_components

    pieces = connected_components(label, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    owner = np.zeros(sizes.size, np.int64)
    owner[pieces.ravel()] = label.ravel()
    candidates = np.arange(1, sizes.size)
    # Largest piece per owner: sort by owner, then by size descending, keep the first of each owner.
    order = candidates[np.lexsort((-sizes[candidates], owner[candidates]))]
    first = np.ones(order.size, bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    best = order[first]
    kept_area = np.zeros(drawn_area.size, np.int64)
    kept_area[owner[best]] = sizes[best]
    keep_id = kept_area >= np.maximum(min_fraction * drawn_area, 12)
    keep_piece = np.zeros(sizes.size, bool)
    keep_piece[best] = keep_id[owner[best]]
    return np.where(keep_piece[pieces], label, 0)


# ----------------------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------------------


def _inner_boundary(label: np.ndarray) -> np.ndarray:
    """Nucleus pixels with a 4-neighbour of another value (background or another nucleus)."""
    edge = np.zeros(label.shape, bool)
    diff_v = label[1:] != label[:-1]
    diff_h = label[:, 1:] != label[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge & (label > 0)


def _render(
    rng: np.random.Generator,
    label: np.ndarray,
    class_of: np.ndarray,
    centres: np.ndarray,
    tissue: _Tissue,
) -> np.ndarray:
    """The RGB tile: H and E concentration maps of tissue and nuclei through the Beer-Lambert stain model.

    ``label`` is the instance map in drawing order; ``class_of`` and ``centres`` are indexed by its ids.
    """
    shape = label.shape
    n_ids = class_of.size
    f32 = np.float32

    # Background: stroma fibres, epithelial cytoplasm, lumens and white space.
    fibres = _oriented_noise(rng, tissue.fibre_angle, [(16.0, 0.8, 0.6), (24.0, 1.6, 0.4)])
    fibre = 1 / (1 + np.exp(f32(-2.5) * (fibres - f32(0.4))))
    mottle = _noise(rng, shape, 2.0)
    solid = 1 - tissue.space
    # Cytoplasm of the stromal and immune cells: a faint purple halo round their nuclei.
    halo = _blur((label > 0).astype(f32), 3.0)
    stroma_e = f32(rng.uniform(0.38, 0.54)) * (0.3 + 1.1 * fibre + 0.1 * mottle + 0.5 * halo) * solid
    stroma_h = f32(0.12) * (0.5 + 0.6 * fibre + 1.5 * halo) * solid
    epi = _blur(tissue.epithelium.astype(f32), 1.2)
    lum = _blur(tissue.lumen.astype(f32), 1.2)
    stroma_w = np.clip(1 - epi - lum, 0, 1)
    cyto_e = f32(rng.uniform(0.3, 0.42)) * (1 + 0.12 * mottle) * (1 - 0.25 * tissue.basal)
    cyto_h = f32(rng.uniform(0.18, 0.3)) * (1 + 0.1 * mottle)
    lumen_e = 0.03 + 0.25 * np.minimum(tissue.secretion, 1.2)
    lumen_h = 0.01 + 0.05 * np.minimum(tissue.secretion, 1.2)
    e_map = stroma_w * stroma_e + epi * cyto_e + lum * lumen_e
    h_map = stroma_w * stroma_h + epi * cyto_h + lum * lumen_h
    blood_map = np.where(label > 0, 0, tissue.blood) * f32(rng.uniform(0.9, 1.4))

    # Nuclei: per-id parameters looked up per pixel, so that the whole tile is rendered at once.
    nuclei = label > 0
    if nuclei.any():
        ids = label[nuclei]
        cls = class_of[ids]
        # Chromatin condensed on the nuclear membrane: strongest on the outline, fading over ~2 px.
        rim = np.minimum(_blur(_inner_boundary(label).astype(f32), 1.0)[nuclei] * 2.5, 1)
        grain = _noise(rng, shape, 0.8)[nuclei]
        clump = _noise(rng, shape, 1.7)[nuclei]
        stain = np.exp(rng.normal(0, 0.13, n_ids)).astype(f32)  # nucleus-to-nucleus staining variation
        # Tumor: vesicular (pale nucleoplasm, chromatin on the membrane and in clumps), one or two nucleoli;
        # a share of them hyperchromatic.
        base = np.where(rng.random(n_ids) < 0.15, 0.8, 0.38).astype(f32)[ids]
        chromatin = np.clip(0.7 * clump + 0.4 * grain + 0.1, 0, None)
        yy, xx = np.nonzero(nuclei)
        nucleolus = np.zeros(ids.size, f32)
        for _ in range(2):
            offset = rng.normal(0, 2.0, (n_ids, 2))
            radius = rng.uniform(1.1, 1.9, n_ids)
            present = rng.random(n_ids) < 0.6
            dist2 = (yy - centres[ids, 0] - offset[ids, 0]) ** 2 + (xx - centres[ids, 1] - offset[ids, 1]) ** 2
            nucleolus += (present[ids] * np.exp(-dist2 / (2 * radius[ids] ** 2))).astype(f32)
        tumor_h = base + 0.3 * rim + 0.4 * chromatin + 0.7 * nucleolus
        # Lymphocyte: dense, dark chromatin; stroma: dark spindle with a fine grain.
        lymph_h = 1.35 * (1 + 0.08 * grain + 0.06 * clump)
        stroma_h_n = 0.85 * (1 + 0.12 * grain) + 0.15 * rim
        nucleus_h = np.select([cls == TUMOR, cls == LYMPHOCYTE], [tumor_h, lymph_h], stroma_h_n) * stain[ids]
        h_map[nuclei] = nucleus_h
        e_map[nuclei] = np.where(cls == TUMOR, 0.16 + 0.3 * nucleolus, 0.14)

    # Beer-Lambert with per-tile stain vectors and strengths, section thickness varying slowly.
    thickness = 1 + 0.08 * _noise(rng, shape, 60.0)
    h_vec = np.clip(H_VECTOR + rng.normal(0, 0.035, 3), 0.05, None)
    e_vec = np.clip(E_VECTOR + rng.normal(0, 0.035, 3), 0.05, None)
    h_vec = (h_vec / np.linalg.norm(h_vec) * rng.uniform(0.8, 1.2)).astype(f32)
    e_vec = (e_vec / np.linalg.norm(e_vec) * rng.uniform(0.75, 1.3)).astype(f32)
    glass = rng.uniform(0.0, 0.04, 3).astype(f32)
    blur = rng.uniform(0.5, 1.0)
    noise_sd = rng.uniform(1.0, 3.0)
    h_map *= thickness
    e_map *= thickness
    image = np.empty((*shape, 3), np.uint8)
    for ch in range(3):
        od = h_map * h_vec[ch] + e_map * e_vec[ch] + blood_map * f32(RBC_VECTOR[ch]) + glass[ch]
        intensity = 255 * np.exp(-od)
        intensity = _blur(intensity, blur)
        intensity += rng.normal(0, noise_sd, shape).astype(f32)
        image[..., ch] = np.clip(np.rint(intensity), 0, 255)
    return image


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_options(
    size: int | tuple[int, int],
    class_fractions: Sequence[float],
    density: float,
    class_dirichlet: float | None,
    areas: Sequence[float],
    tumor_packing: float,
    lymph_clustering: float,
    white_space: float,
) -> tuple[tuple[int, int], np.ndarray]:
    """Validate the options of :func:`synth_tile`; return the tile shape and the normalised class fractions."""
    shape = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(shape) < 16:
        raise ValueError(f"tile size must be at least 16 px, got {shape[0]}x{shape[1]}")
    fractions = np.asarray(class_fractions, dtype=np.float64)
    if fractions.shape != (3,) or not np.all(np.isfinite(fractions)) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"class_fractions must be 3 non-negative numbers, not all 0; got {list(class_fractions)}")
    if len(areas) != 3 or min(areas) <= 0:
        raise ValueError(f"areas must be 3 positive numbers; got {list(areas)}")
    checks = {
        "density must be >= 0": density >= 0,
        "class_dirichlet must be > 0 or None": class_dirichlet is None or class_dirichlet > 0,
        "tumor_packing must be in (0, 1]": 0 < tumor_packing <= 1,
        "lymph_clustering must be in [0, 1]": 0 <= lymph_clustering <= 1,
        "white_space must be in [0, 1)": 0 <= white_space < 1,
    }
    for message, ok in checks.items():
        if not ok:
            raise ValueError(message)
    return shape, fractions / fractions.sum()


def synth_tile(
    rng_or_seed: np.random.Generator | int | None,
    size: int | tuple[int, int] = 512,
    *,
    class_fractions: Sequence[float] = DEFAULT_CLASS_FRACTIONS,
    density: float = DEFAULT_DENSITY,
    class_dirichlet: float | None = 12.0,
    areas: Sequence[float] = DEFAULT_AREAS,
    tumor_packing: float = 0.9,
    lymph_clustering: float = 0.5,
    white_space: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic 40x H&E tile and its label.

    Args:
        rng_or_seed: a numpy Generator (consumed) or a seed.
        size: side of a square tile, or ``(height, width)``, in px.
        class_fractions: expected share of tumor, lymphocyte and stroma nuclei (normalised to sum to 1).
        density: expected nuclei per 1000x1000 px (CoNSeP: about 560). Very high tumor densities are capped
            by the room the glands leave (about 700 tumor nuclei per 1000x1000 px).
        class_dirichlet: total concentration of the per-tile Dirichlet variation of the class mix around
            ``class_fractions`` (larger: closer; 12 gives a spread of about 0.13 per class); ``None`` uses
            ``class_fractions`` exactly.
        areas: median nucleus area in px of tumor, lymphocyte and stroma nuclei.
        tumor_packing: share of the epithelium covered by tumor nuclei (glands are sized from it).
        lymph_clustering: share of lymphocytes gathered in aggregates rather than scattered.
        white_space: share of the stroma that is white space.

    Returns:
        ``(image, label)``: RGB ``uint8`` H x W x 3 and ``int32`` H x W in the paper's encoding.
    """
    shape, fractions = _check_options(
        size, class_fractions, density, class_dirichlet, areas, tumor_packing, lymph_clustering, white_space
    )
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    height, width = shape

    # 1. Composition.
    if class_dirichlet:
        present = fractions > 0
        mix = np.zeros(3)
        mix[present] = rng.dirichlet(class_dirichlet * fractions[present])
    else:
        mix = fractions
    expected = density * height * width / 1e6 * math.exp(rng.normal(0, 0.2))
    counts = rng.multinomial(rng.poisson(expected), mix)

    # 2. Tissue.
    tissue = _tissue(rng, shape, counts[TUMOR] * areas[TUMOR] / tumor_packing, white_space)
    gland = tissue.epithelium | tissue.lumen
    stroma = (~gland).astype(np.float32) * (1 - tissue.space) ** 2

    # 3. Nuclei: tumor in the basal half of the epithelium, stroma along the fibres, lymphocytes last.
    canvas = _Canvas(np.zeros(shape, np.int32))
    tumor_weight = tissue.epithelium * (0.3 + np.exp(-(((tissue.basal - 0.35) / 0.3) ** 2)))
    canvas.place(rng, TUMOR, counts[TUMOR], tumor_weight, areas[TUMOR], tissue.normal, 0.35, max_overlap=0.15)
    canvas.place(rng, STROMA, counts[STROMA], stroma, areas[STROMA], tissue.fibre_angle, 0.15, max_overlap=0.06)
    aggregates = np.zeros(shape, np.float32)
    for _ in range(rng.poisson(1.5 * height * width / 512**2) + 1):
        y, x = _sample_positions(rng, stroma, 1)[0] if stroma.any() else (height / 2, width / 2)
        sigma = rng.uniform(20, 55)
        gy = np.exp(-(((np.arange(height) - y) / sigma) ** 2) / 2)[:, None]
        gx = np.exp(-(((np.arange(width) - x) / sigma) ** 2) / 2)[None, :]
        aggregates += (gy * gx).astype(np.float32)
    scattered = stroma + 0.05 * tissue.epithelium
    lymph_weight = (1 - lymph_clustering) * scattered / max(scattered.sum(), 1e-6)
    if lymph_clustering > 0:
        clustered = aggregates * (~tissue.lumen) * (1 - tissue.space)
        lymph_weight = lymph_weight + lymph_clustering * clustered / max(clustered.sum(), 1e-6)
    canvas.place(rng, LYMPHOCYTE, counts[LYMPHOCYTE], lymph_weight, areas[LYMPHOCYTE], max_overlap=0.12)
    instances = _keep_connected(canvas.label, np.asarray(canvas.drawn))

    # Paper encoding: the k-th kept nucleus of class c (k = 0, 1, ..., in drawing order) gets id 3k + c,
    # tumor from k = 1 because 0 is the background.
    classes = np.asarray([-1] + [s.cls for s in canvas.shapes])
    kept = np.zeros(classes.size, bool)
    kept[np.unique(instances)] = True
    new_id = np.zeros(classes.size, np.int64)
    for c in (TUMOR, LYMPHOCYTE, STROMA):
        members = np.flatnonzero((classes == c) & kept)
        first = 1 if c == TUMOR else 0
        new_id[members] = 3 * (np.arange(members.size) + first) + c
    label = new_id[instances].astype(np.int32)
    image = _render(rng, instances, np.maximum(classes, 0), np.asarray([(0.0, 0.0), *canvas.centres]), tissue)
    return image, label


def _tile_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of tile ``index``: depends only on ``(seed, index)`` (a spawned child of the seed)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def write_dataset(
    out_dir: str | os.PathLike[str],
    n_images: int,
    size: int | tuple[int, int] = 512,
    seed: int = 0,
    *,
    prefix: str = "synth",
    class_fractions: Sequence[float] = DEFAULT_CLASS_FRACTIONS,
    density: float = DEFAULT_DENSITY,
    class_dirichlet: float | None = 12.0,
    areas: Sequence[float] = DEFAULT_AREAS,
    tumor_packing: float = 0.9,
    lymph_clustering: float = 0.5,
    white_space: float = 0.2,
) -> list[Path]:
    """Write ``n_images`` synthetic tiles as ``<prefix>_000.png`` with ``<prefix>_000_label.png`` beside them.

    Tile ``i`` depends only on ``seed`` and ``i`` (writing 5 or 10 tiles gives the same first 5). Files are
    written atomically, the label before its image, so an interrupted run never leaves an image without its
    label. The other options are those of :func:`synth_tile`. Returns the image paths.
    """
    from nucleiseg.io import write_image
    from nucleiseg.labels import write_label

    options = {
        "class_fractions": class_fractions,
        "density": density,
        "class_dirichlet": class_dirichlet,
        "areas": areas,
        "tumor_packing": tumor_packing,
        "lymph_clustering": lymph_clustering,
        "white_space": white_space,
    }
    _check_options(size, **options)  # before anything is written
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_images):
        image, label = synth_tile(_tile_rng(seed, i), size, **options)
        name = f"{prefix}_{i:03d}"
        write_label(out / f"{name}_label.png", label)
        write_image(out / f"{name}.png", image)
        paths.append(out / f"{name}.png")
    return paths
