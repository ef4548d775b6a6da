"""The per-nucleus measurement table, in real units: shape, stain and class of every nucleus of a label image.

One row per nucleus (ascending id), columns :data:`TABLE_COLUMNS`, units in the column names (``_px``
pixels, ``_um`` micrometres, ``_um2`` square micrometres, ``_deg`` degrees, ``_od`` optical density):

``image``
    The image (or slide) name, so that the tables of many images concatenate.
``id``, ``class``
    The label id and its class name (``id % 3``: tumor, lymphocyte, stroma; :mod:`nucleiseg.labels`).
``class_probability``
    How sure the network is of the nucleus's class: the mean over the nucleus's pixels of the softmax of its
    class's "inside" map, renormalised over the three nucleus classes, ``p[1 + c] / (p[1] + p[2] + p[3])``.
    Renormalised so that the contour and background mass at the nucleus's rim (its pixels include the
    one-pixel dilation of post-processing) does not lower it: 1 means no pixel leaned to another class.
    NaN when no probabilities were given.
``centroid_x_px``, ``centroid_y_px``; ``centroid_x_um``, ``centroid_y_um``
    The mean position of the nucleus's pixels with the origin at the top-left *corner* of the image (pixel
    ``(r, c)`` has its centre at ``(c + 0.5, r + 0.5)``; QuPath's convention, as in :mod:`nucleiseg.export`),
    plus ``offset`` when the label is a chunk of a larger image; in micrometres: ``px * mpp``.
``area_um2``, ``perimeter_um``, ``equivalent_diameter_um``
    Pixel count times ``mpp^2``; ``skimage.measure.perimeter`` (4-connected boundary, diagonal steps
    ``sqrt(2)``) times ``mpp``; the diameter of the disc of the same area.
``major_axis_um``, ``minor_axis_um``, ``eccentricity``
    Of the ellipse with the same second central moments as the nucleus (``regionprops``' ``axis_*_length``,
    ``eccentricity``).
``orientation_deg``
    The angle of that ellipse's major axis to the image's horizontal, counter-clockwise *as seen on screen*
    (rows grow downwards), in ``(-90, 90]``: 0 horizontal, 45 rising to the right, 90 vertical.
``solidity``
    Area over the area of the convex hull (``regionprops``).
``hematoxylin_od_mean``, ``hematoxylin_od_std``, ``eosin_od_mean``, ``eosin_od_std``
    Mean and (population) standard deviation over the nucleus's pixels of the haematoxylin and eosin optical
    densities, in natural optical-density units: each pixel's ``OD = -log10((I + 1) / I0)`` per RGB channel
    (``I0`` = 240, the glass brightness of :mod:`nucleiseg.stain`, whose Macenko fit uses the same OD up to
    the log base) is unmixed by least squares into ``OD ~= h * H + e * E`` with ``H``, ``E`` the unit stain
    vectors (columns of ``stain_matrix``). So a pixel whose OD is one unit along ``H`` reads ``h = 1``
    (skimage's ``rgb2hed`` would read 0.167 there). The stain matrix is the one the model was trained with
    (the Macenko fit of the training set's reference tile, ``stain.json`` and the checkpoint's ``stain``
    entry: :func:`stain_matrix_of`) where there is one, else Ruifrok & Johnston's H and E vectors
    (:data:`RUIFROK_HE`). Least squares can give slightly negative densities on near-white pixels; they are
    kept, not clipped, so that means stay unbiased.
``um_per_px``
    The ``mpp`` the micrometre columns were computed with.

Shape figures come from :func:`skimage.measure.regionprops_table` with ``spacing=(mpp, mpp)``; the stain
densities and the class probability are its ``intensity_mean`` / ``intensity_std`` over per-pixel maps
computed for the nuclei's pixels only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from nucleiseg.labels import CLASS_NAMES
from nucleiseg.stain import IO

if TYPE_CHECKING:
    import pandas as pd

#: Tumor / lymphocyte / stroma scale of the project's data: 40x scanning, about 0.25 um per pixel (the synthetic
#: tiles imitate CoNSeP at that scale). Used only where no ``mpp`` is given (params ``spatial.mpp`` sets it).
DEFAULT_MPP = 0.25

#: Ruifrok & Johnston's (2001) haematoxylin and eosin OD vectors (skimage's ``rgb_from_hed`` rows), normalised
#: to unit length, as the columns of a 3 x 2 matrix (rows R, G, B).
RUIFROK_HE: np.ndarray = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]) / np.linalg.norm(
    np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]), axis=0
)

TABLE_COLUMNS: tuple[str, ...] = (
    "image",
    "id",
    "class",
    "class_probability",
    "centroid_x_px",
    "centroid_y_px",
    "centroid_x_um",
    "centroid_y_um",
    "area_um2",
    "perimeter_um",
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "orientation_deg",
    "solidity",
    "hematoxylin_od_mean",
    "hematoxylin_od_std",
    "eosin_od_mean",
    "eosin_od_std",
    "um_per_px",
)
_TEXT_COLUMNS = ("image", "class")
_INT_COLUMNS = ("id",)
_PROPERTIES = (
    "label",
    "area",
    "centroid",
    "perimeter",
    "equivalent_diameter_area",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "orientation",
    "solidity",
    "intensity_mean",
    "intensity_std",
)
_LN10 = math.log(10.0)


def stain_matrix_of(stain: Any) -> np.ndarray | None:
    """The 3 x 2 H and E stain matrix of a fitted normaliser (a :class:`nucleiseg.stain.StainNormalizer` or its
    ``to_dict()`` form, e.g. a checkpoint's ``stain`` entry); None when it is not a Macenko fit (none, Reinhard),
    so that :func:`nuclei_table` falls back to :data:`RUIFROK_HE`."""
    if stain is None:
        return None
    if hasattr(stain, "reference"):  # a slide's fixed-source normaliser: the model's vectors are its reference's
        return stain_matrix_of(stain.reference)
    if isinstance(stain, Mapping):
        matrix = stain.get("stain_matrix") if stain.get("method") == "macenko" else None
    else:
        matrix = getattr(stain, "stain_matrix", None) if getattr(stain, "method", None) == "macenko" else None
    return None if matrix is None else _check_stain_matrix(matrix)


def _check_stain_matrix(matrix: Any) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 2) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"stain_matrix must be 3 x 2 finite numbers (R, G, B rows; H, E columns), got {matrix!r}")
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms < 1e-9):
        raise ValueError("stain_matrix has a zero stain vector")
    return matrix / norms  # unit vectors: densities are then in OD units along each stain


def stain_densities(pixels: np.ndarray, stain_matrix: np.ndarray | None = None, io: float = IO) -> np.ndarray:
    """Haematoxylin and eosin optical densities ``(N, 2)`` (float32, columns H, E) of ``(N, 3)`` uint8 RGB
    pixels: ``-log10((I + 1) / io)`` unmixed by least squares with the unit stain vectors (module docstring)."""
    matrix = RUIFROK_HE if stain_matrix is None else _check_stain_matrix(stain_matrix)
    od = -np.log((pixels.astype(np.float32) + np.float32(1.0)) / np.float32(io)) / np.float32(_LN10)
    return od @ np.linalg.pinv(matrix).T.astype(np.float32)


def _empty_table() -> pd.DataFrame:
    import pandas as pd

    def dtype(column: str) -> Any:
        return object if column in _TEXT_COLUMNS else np.int64 if column in _INT_COLUMNS else np.float64

    return pd.DataFrame({c: pd.Series(dtype=dtype(c)) for c in TABLE_COLUMNS})


def nuclei_table(
    label: np.ndarray,
    image: np.ndarray,
    *,
    mpp: float,
    probs: np.ndarray | None = None,
    stain_matrix: np.ndarray | None = None,
    image_name: str = "",
    offset: tuple[float, float] = (0.0, 0.0),
    io: float = IO,
) -> pd.DataFrame:
    """One row per nucleus of ``label`` (paper encoding, 2-D integer) with the columns :data:`TABLE_COLUMNS`
    (definitions in the module docstring), in ascending id order.

    ``image``: the RGB uint8 H&E image the label segments (same height and width), as scanned (not
    stain-normalised). ``mpp``: micrometres per pixel. ``probs``: the network's softmax maps ``(5, H, W)``
    (or only the three nucleus maps ``(3, H, W)``), any float dtype; without them ``class_probability`` is NaN.
    ``stain_matrix``: 3 x 2 H and E OD vectors (:func:`stain_matrix_of`); None: Ruifrok & Johnston's.
    ``offset = (y, x)`` in pixels is added to the pixel centroids (and so to the micrometre ones): pass the
    chunk's top-left corner when measuring a chunk of a slide. Per call the cost is one pass of
    ``regionprops_table`` plus per-pixel maps of the nuclei's pixels only; nothing is global or cached.
    """
    import pandas as pd
    from skimage.measure import regionprops_table

    from nucleiseg.export import _check_label

    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    label = _check_label(label, image)
    if probs is not None:
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[0] not in (3, 5) or probs.shape[1:] != label.shape:
            raise ValueError(f"probs must be (5, H, W) or (3, H, W) with H, W = {label.shape}, got {probs.shape}")
    foreground = label > 0
    if not foreground.any():
        return _empty_table()

    # Per-pixel maps, filled for the nuclei's pixels only (the rest is never read by regionprops).
    n_channels = 3 if probs is not None else 2
    values = np.zeros((*label.shape, n_channels), dtype=np.float32)
    values[foreground, :2] = stain_densities(image[foreground], stain_matrix, io)
    if probs is not None:
        nucleus_maps = probs[-3:] if probs.shape[0] == 3 else probs[1:4]
        own = label[foreground] % 3
        inside = nucleus_maps[:, foreground].astype(np.float32)
        total = inside.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            values[foreground, 2] = np.where(total > 0, inside[own, np.arange(own.size)] / total, 0.0)
    props = regionprops_table(
        label.astype(np.int32, copy=False), values, properties=_PROPERTIES, spacing=(float(mpp), float(mpp))
    )
    ids = props["label"].astype(np.int64)
    # regionprops' centroid is the mean pixel index times the spacing: back to pixels, corner origin, offset.
    centroid_y_px = props["centroid-0"] / mpp + 0.5 + float(offset[0])
    centroid_x_px = props["centroid-1"] / mpp + 0.5 + float(offset[1])
    # skimage's orientation is from the row axis (pointing down) towards the column axis; on screen (y up) the
    # major axis is then at orientation - 90 degrees from the horizontal, folded into (-90, 90].
    angle = np.degrees(props["orientation"]) - 90.0
    angle = np.where(angle <= -90.0, angle + 180.0, angle)
    columns = {
        "image": [image_name] * len(ids),
        "id": ids,
        "class": [CLASS_NAMES[i % 3] for i in ids],
        "class_probability": props["intensity_mean-2"] if probs is not None else np.full(len(ids), np.nan),
        "centroid_x_px": centroid_x_px,
        "centroid_y_px": centroid_y_px,
        "centroid_x_um": centroid_x_px * mpp,
        "centroid_y_um": centroid_y_px * mpp,
        "area_um2": props["area"],
        "perimeter_um": props["perimeter"],
        "equivalent_diameter_um": props["equivalent_diameter_area"],
        "major_axis_um": props["axis_major_length"],
        "minor_axis_um": props["axis_minor_length"],
        "eccentricity": props["eccentricity"],
        "orientation_deg": angle,
        "solidity": props["solidity"],
        "hematoxylin_od_mean": props["intensity_mean-0"],
        "hematoxylin_od_std": props["intensity_std-0"],
        "eosin_od_mean": props["intensity_mean-1"],
        "eosin_od_std": props["intensity_std-1"],
        "um_per_px": np.full(len(ids), float(mpp)),
    }
    table = pd.DataFrame(columns, columns=list(TABLE_COLUMNS))
    float_columns = [c for c in TABLE_COLUMNS if c not in _TEXT_COLUMNS + _INT_COLUMNS]
    table[float_columns] = table[float_columns].astype(np.float64)
    return table


def nuclei_centroids(
    label: np.ndarray, *, mpp: float, image_name: str = "", offset: tuple[float, float] = (0.0, 0.0)
) -> pd.DataFrame:
    """The position columns of :func:`nuclei_table` only (``image``, ``id``, ``class``, centroids in px and um,
    ``area_um2``, ``um_per_px``), from per-id pixel sums: what the spatial statistics need when there is a label
    but no H&E image."""
    import pandas as pd

    from nucleiseg.export import _check_label

    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}")
    label = _check_label(label)
    rows, cols = np.nonzero(label)
    ids_of_pixels = label[rows, cols]
    n = np.bincount(ids_of_pixels, minlength=1)
    ids = np.flatnonzero(n)
    ids = ids[ids > 0]
    x_px = np.bincount(ids_of_pixels, weights=cols, minlength=1)[ids] / n[ids] + 0.5 + float(offset[1])
    y_px = np.bincount(ids_of_pixels, weights=rows, minlength=1)[ids] / n[ids] + 0.5 + float(offset[0])
    return pd.DataFrame(
        {
            "image": [image_name] * len(ids),
            "id": ids.astype(np.int64),
            "class": [CLASS_NAMES[i % 3] for i in ids],
            "centroid_x_px": x_px,
            "centroid_y_px": y_px,
            "centroid_x_um": x_px * mpp,
            "centroid_y_um": y_px * mpp,
            "area_um2": n[ids] * float(mpp) ** 2,
            "um_per_px": np.full(len(ids), float(mpp)),
        }
    )


def write_table(table: pd.DataFrame, path: Any) -> None:
    """Write a nuclei table atomically: Parquet when ``path`` ends in ``.parquet``, else CSV (6 significant
    digits)."""
    from pathlib import Path

    from nucleiseg.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, float_format="%.6g")


def read_table(path: Any) -> pd.DataFrame:
    """Read a nuclei table written by :func:`write_table` (Parquet or CSV); raises ``ValueError`` naming the
    file when it is unreadable or lacks the columns the spatial statistics need."""
    from pathlib import Path

    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: nuclei table not found") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable nuclei table ({exc})") from None
    missing = [c for c in ("class", "centroid_x_px", "centroid_y_px") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a nuclei table (missing columns {', '.join(missing)})")
    return table


__all__ = [
    "DEFAULT_MPP",
    "RUIFROK_HE",
    "TABLE_COLUMNS",
    "nuclei_centroids",
    "nuclei_table",
    "read_table",
    "stain_densities",
    "stain_matrix_of",
    "write_table",
]
