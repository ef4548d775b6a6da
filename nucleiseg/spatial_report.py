"""The spatial report a person reads: one self-contained HTML page and a JSON of its figures per image or slide.

:func:`write_spatial_report` takes a per-nucleus table (:mod:`nucleiseg.measure`), computes the statistics of
:mod:`nucleiseg.spatial` and writes into ``out_dir``:

``spatial.json`` (``<name>_spatial.json`` with a ``name``)
    Every figure (strict JSON, NaN written as null): the window and its area, per-class counts, fractions and
    densities per mm^2, nearest-neighbour summaries and contact fractions, the L functions with their envelopes
    and global tests, the neighbourhood-enrichment matrix, the Morisita-Horn matrix, the settings and the mpp.
``spatial_report.html`` (``<name>_spatial.html``)
    Renders offline: no script, no stylesheet or font from a network; every plot is a PNG embedded as a
    ``data:`` URI (matplotlib, Agg). In order: the figures table, the image with its nuclei coloured by class,
    a density map per class, the nearest-neighbour histograms, the L-function curves with their envelopes and
    the enrichment matrix, each with one line saying how to read it. Class colours are those of
    :mod:`nucleiseg.palette`, with a legend.

The window of the statistics: the tissue mask when given, else the image rectangle (``image_shape``), else the
nuclei's bounding box (said so in the report).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nucleiseg.labels import CLASS_NAMES
from nucleiseg.palette import CLASS_COLORS, CLASS_HEX, legend_html
from nucleiseg.spatial import N_CLASSES, SpatialResult, SpatialSettings, Window, class_codes, spatial_statistics

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

JSON_NAME = "spatial.json"
HTML_NAME = "spatial_report.html"
_DPI = 110
_MAX_THUMBNAIL_SIDE = 1600  # px of the embedded image panel


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def table_points(table: pd.DataFrame, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Centroids in um ``(N, 2)`` and class codes of a nuclei table: its ``centroid_*_um`` columns, else its pixel
    centroids times ``mpp``. Raises ``ValueError`` when the table was measured at another ``mpp``."""
    if "um_per_px" in table.columns and len(table):
        recorded = np.unique(table["um_per_px"].to_numpy(dtype=np.float64))
        if len(recorded) > 1 or not math.isclose(float(recorded[0]), mpp, rel_tol=1e-6):
            raise ValueError(f"the table was measured at {recorded.tolist()} um/px, not at --mpp {mpp}")
    if {"centroid_x_um", "centroid_y_um"} <= set(table.columns):
        xy = table[["centroid_x_um", "centroid_y_um"]].to_numpy(dtype=np.float64)
    else:
        xy = table[["centroid_x_px", "centroid_y_px"]].to_numpy(dtype=np.float64) * mpp
    return xy, class_codes(table["class"].to_numpy())


def make_window(
    xy: np.ndarray, mpp: float, image_shape: tuple[int, int] | None = None, tissue_mask: np.ndarray | None = None
) -> Window:
    """The statistics' window (module docstring). ``image_shape``: (height, width) in px of the full image;
    ``tissue_mask``: a 2-D boolean raster covering that image (any resolution; needs ``image_shape``)."""
    if tissue_mask is not None:
        if image_shape is None:
            raise ValueError("a tissue mask needs the image shape it covers")
        height, width = image_shape[0] * mpp, image_shape[1] * mpp
        mask = np.asarray(tissue_mask).astype(bool)
        area_mm2 = np.count_nonzero(mask) / mask.size * width * height * 1e-6
        return Window(width, height, mask=mask, description=f"tissue mask, {area_mm2:.3f} mm² of tissue")
    if image_shape is not None:
        height, width = image_shape[0] * mpp, image_shape[1] * mpp
        return Window.rectangle(width, height, f"the whole image, {width:.0f} x {height:.0f} µm")
    if len(xy) < 2:
        raise ValueError("at least two nuclei, or the image shape, are needed to define the window")
    return Window.bounding_box(xy)


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _downsample(image: np.ndarray, max_side: int) -> np.ndarray:
    step = max(1, math.ceil(max(image.shape[:2]) / max_side))
    return image[::step, ::step]


def _class_image(thumbnail: np.ndarray | None, label: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """The thumbnail (or white) with each nucleus's pixels blended towards its class colour."""
    label = _downsample(label, _MAX_THUMBNAIL_SIDE)
    if thumbnail is None:
        base = np.full((*label.shape, 3), 255.0)
    else:
        import cv2

        base = cv2.resize(np.asarray(thumbnail), (label.shape[1], label.shape[0]), interpolation=cv2.INTER_AREA)
        base = base.astype(np.float64)
    palette = np.asarray(CLASS_COLORS, dtype=np.float64)
    inside = label > 0
    base[inside] = (1 - alpha) * base[inside] + alpha * palette[label[inside] % 3]
    return np.clip(base, 0, 255).astype(np.uint8)


def plot_nuclei(
    xy: np.ndarray,
    codes: np.ndarray,
    window: Window,
    thumbnail: np.ndarray | None = None,
    label: np.ndarray | None = None,
    diameter_um: float = 7.0,
) -> str:
    """The image (thumbnail) with the nuclei coloured by class: filled masks when ``label`` is given, else dots."""
    extent = (window.x0, window.x0 + window.width, window.y0 + window.height, window.y0)
    aspect = window.height / window.width
    fig = _figure(9.6, min(max(8.0 * aspect, 2.5), 11.0) + 0.6)  # the legend takes the extra width
    ax = fig.add_subplot()
    if label is not None:
        ax.imshow(_class_image(thumbnail, label), extent=extent, interpolation="nearest")
    else:
        if thumbnail is not None:
            ax.imshow(_downsample(np.asarray(thumbnail), _MAX_THUMBNAIL_SIDE), extent=extent)
        # Dots half a nucleus wide, at least a point: the tissue stays visible, dense slides become colour fields.
        points_per_um = fig.get_figwidth() * 72 / window.width
        size = float(np.clip(0.5 * diameter_um * points_per_um, 1.0, 8.0)) ** 2
        colours = np.asarray(CLASS_HEX)[codes]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colours, linewidths=0, rasterized=True)
    if window.mask is not None:
        ax.contour(
            np.linspace(window.x0, window.x0 + window.width, window.mask.shape[1]),
            np.linspace(window.y0, window.y0 + window.height, window.mask.shape[0]),
            window.mask.astype(float), levels=[0.5], colors="0.3", linewidths=0.8,
        )  # fmt: skip
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    _legend(fig)
    return _png(fig)


def _legend(fig: Figure) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_HEX[c], label=CLASS_NAMES[c]) for c in range(N_CLASSES)]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=10)


def density_maps(xy: np.ndarray, codes: np.ndarray, window: Window, bandwidth_um: float) -> tuple[np.ndarray, float]:
    """Per class, nuclei per mm^2 on a grid: counts in cells of ``cell`` um smoothed by a Gaussian of sd
    ``bandwidth_um``; NaN outside the tissue mask. Returns ``(maps (3, rows, cols), cell)``."""
    from scipy.ndimage import gaussian_filter

    cell = max(bandwidth_um / 4, max(window.width, window.height) / 400)
    n_cols, n_rows = max(1, math.ceil(window.width / cell)), max(1, math.ceil(window.height / cell))
    cols = np.clip(((xy[:, 0] - window.x0) / cell).astype(np.int64), 0, n_cols - 1)
    rows = np.clip(((xy[:, 1] - window.y0) / cell).astype(np.int64), 0, n_rows - 1)
    maps = np.zeros((N_CLASSES, n_rows, n_cols))
    for c in range(N_CLASSES):
        keep = codes == c
        counts = np.bincount(rows[keep] * n_cols + cols[keep], minlength=n_rows * n_cols).reshape(n_rows, n_cols)
        maps[c] = gaussian_filter(counts.astype(np.float64), bandwidth_um / cell, mode="constant") / (cell**2 * 1e-6)
    if window.mask is not None:
        import cv2

        tissue = cv2.resize(window.mask.astype(np.uint8), (n_cols, n_rows), interpolation=cv2.INTER_NEAREST) > 0
        maps[:, ~tissue] = np.nan
    return maps, cell


def plot_densities(xy: np.ndarray, codes: np.ndarray, window: Window, bandwidth_um: float) -> str:
    """One density map per class (nuclei per mm^2), each with its own colour bar."""
    maps, _ = density_maps(xy, codes, window, bandwidth_um)
    extent = (window.x0, window.x0 + window.width, window.y0 + window.height, window.y0)
    aspect = window.height / window.width
    fig = _figure(12.0, min(max(4.0 * aspect, 1.8), 6.0) + 0.9)
    for c in range(N_CLASSES):
        ax = fig.add_subplot(1, N_CLASSES, c + 1)
        image = ax.imshow(maps[c], extent=extent, cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(CLASS_NAMES[c], color=CLASS_HEX[c], fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8, label="nuclei / mm²")
    return _png(fig)


def plot_nearest_neighbours(distances: Mapping[tuple[int, int], np.ndarray], contact_radius_um: float) -> str:
    """Histograms of the nearest-neighbour distances, row = from class, column = to class."""
    fig = _figure(11.0, 8.0)
    pooled = np.concatenate([d for d in distances.values() if len(d)] or [np.zeros(1)])
    top = max(float(np.percentile(pooled, 99)), contact_radius_um * 1.2, 1.0)
    bins = np.linspace(0, top, 41)
    axes = fig.subplots(N_CLASSES, N_CLASSES, sharex=True)
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            ax, d = axes[i, j], distances[i, j]
            if len(d):
                ax.hist(np.minimum(d, top), bins=bins, color=CLASS_HEX[j], edgecolor="white", linewidth=0.3)
                ax.axvline(float(np.median(d)), color="black", linewidth=1.2)
                ax.text(0.97, 0.93, f"median {np.median(d):.1f} µm\nn = {len(d)}", transform=ax.transAxes,
                        ha="right", va="top", fontsize=8)  # fmt: skip
            else:
                ax.text(0.5, 0.5, "no nuclei", transform=ax.transAxes, ha="center", va="center", color="0.5")
            ax.axvline(contact_radius_um, color="0.4", linestyle="--", linewidth=0.9)
            ax.set_title(f"{CLASS_NAMES[i]} → nearest {CLASS_NAMES[j]}", fontsize=9)
            if i == N_CLASSES - 1:
                ax.set_xlabel("distance (µm)")
            if j == 0:
                ax.set_ylabel("nuclei")
    return _png(fig)


def plot_l_functions(result: SpatialResult) -> str:
    """``L(r) - r`` of each class pair with its simulation envelope (grey) and the MAD test p-value."""
    lf = result.l_function
    fig = _figure(12.0, 6.6)
    axes = fig.subplots(2, 3, sharex=True)
    pairs = [(i, j) for i in range(N_CLASSES) for j in range(i, N_CLASSES)]
    for ax, (i, j) in zip(axes.ravel(), pairs, strict=True):
        curve = lf.l_minus_r[i, j]
        ax.axhline(0, color="0.6", linewidth=0.8)
        if np.all(np.isnan(curve)):
            ax.text(0.5, 0.5, "too few nuclei", transform=ax.transAxes, ha="center", va="center", color="0.5")
        else:
            ax.fill_between(lf.radii, lf.low[i, j], lf.high[i, j], color="0.82")
            ax.plot(lf.radii, curve, color=CLASS_HEX[i] if i == j else "black", linewidth=1.8)
            ax.text(0.03, 0.05, f"MAD test p = {lf.mad_p[i, j]:.3f}", transform=ax.transAxes, fontsize=8)
        name = CLASS_NAMES[i] if i == j else f"{CLASS_NAMES[i]} – {CLASS_NAMES[j]}"
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("r (µm)")
        ax.set_ylabel("L(r) − r (µm)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(color="0.82", label=f"{lf.null} envelope ({lf.simulations} simulations)"),
        Line2D([], [], color="black", linewidth=1.8, label="observed (in the class colour for one class)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    return _png(fig)


def plot_enrichment(result: SpatialResult) -> str:
    """The neighbourhood-enrichment z-score matrix, diverging around 0, numbers printed."""
    z = result.enrichment.z
    bound = max(3.0, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 3.0)
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    image = ax.imshow(z, cmap="RdBu_r", vmin=-bound, vmax=bound)
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            text = "–" if np.isnan(z[i, j]) else f"{z[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=11,
                    color="white" if abs(np.nan_to_num(z[i, j])) > 0.6 * bound else "black")  # fmt: skip
    ax.set_xticks(range(N_CLASSES), CLASS_NAMES)
    ax.set_yticks(range(N_CLASSES), CLASS_NAMES)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for c, tick in enumerate(ticks):
            tick.set_color(CLASS_HEX[c])
            tick.set_fontweight("bold")
    ax.set_xlabel("neighbour class")
    ax.set_ylabel("nucleus class")
    fig.colorbar(image, ax=ax, label="z-score (vs label permutations)")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin: 28px 0 4px; border-bottom: 1px solid #ccc; }
p.how { margin: 2px 0 8px; color: #444; font-size: 14px; } .meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.name, th.name { text-align: left; } img { max-width: 100%; }
.legend { margin: 8px 0; font-size: 14px; }
.swatch { display: inline-block; width: 14px; height: 14px; margin: 0 5px -2px 0; border: 1px solid #555; }
.tables { display: flex; flex-wrap: wrap; gap: 28px; } .tables div { flex: 0 0 auto; }
"""


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _percent(fraction: float | None, digits: int = 1) -> str:
    return (
        "–"
        if fraction is None or (isinstance(fraction, float) and math.isnan(fraction))
        else _cell(100 * fraction, digits)
    )


def _class_th(c: int) -> str:
    return f'<th class="name"><span class="swatch" style="background:{CLASS_HEX[c]}"></span>{CLASS_NAMES[c]}</th>'


def _matrix_table(title: str, values: Any, digits: int = 2) -> str:
    head = "".join(f"<th>{html.escape(CLASS_NAMES[j])}</th>" for j in range(N_CLASSES))
    rows = "".join(
        "<tr>" + _class_th(i) + "".join(f"<td>{values(i, j)}</td>" for j in range(N_CLASSES)) + "</tr>"
        for i in range(N_CLASSES)
    )
    return f'<div><b>{html.escape(title)}</b><table><tr><th class="name">from \\ to</th>{head}</tr>{rows}</table></div>'


def figures_html(figures: Mapping[str, Any]) -> str:
    """The table of figures: per class counts and densities, then the class-pair matrices."""
    settings = figures["settings"]
    per_class = "".join(
        f"<tr>{_class_th(c)}<td>{figures['counts'][n]:,}</td><td>{_percent(figures['fractions'][n])}</td>"
        f"<td>{_cell(figures['density_per_mm2'][n], 0)}</td></tr>"
        for c, n in enumerate(CLASS_NAMES)
    )
    per_class += (
        f'<tr><th class="name">all</th><td>{figures["nuclei"]:,}</td><td>100.0</td>'
        f"<td>{_cell(figures['density_all_per_mm2'], 0)}</td></tr>"
    )
    nn = figures["nearest_neighbour"]
    ne = figures["neighbourhood_enrichment"]
    mh = figures["morisita_horn"]["index"]
    lf = figures["l_function"]["pairs"]

    def median(i: int, j: int) -> str:
        s = nn[CLASS_NAMES[i]][CLASS_NAMES[j]]
        return "–" if s["n"] == 0 else f"{s['median_um']:.1f} ({s['q1_um']:.1f}–{s['q3_um']:.1f})"

    def l_test(i: int, j: int) -> str:
        pair = lf[f"{CLASS_NAMES[min(i, j)]}-{CLASS_NAMES[max(i, j)]}"]
        return _cell(pair["mad_test_p"], 3)

    blocks = [
        '<div><b>Per class</b><table><tr><th class="name">class</th><th>nuclei</th><th>%</th>'
        f"<th>per mm²</th></tr>{per_class}</table></div>",
        _matrix_table("Nearest-neighbour distance, median (IQR), µm", median),
        _matrix_table(
            f"Fraction with a neighbour within {settings['contact_radius_um']:g} µm",
            lambda i, j: _cell(nn[CLASS_NAMES[i]][CLASS_NAMES[j]]["fraction_within"], 2),
        ),
        _matrix_table(
            f"Neighbourhood enrichment z (radius {settings['neighbourhood_radius_um']:g} µm, "
            f"{ne['permutations']} permutations)",
            lambda i, j: _cell(ne["z"][CLASS_NAMES[i]][CLASS_NAMES[j]], 1),
        ),
        _matrix_table(
            f"Morisita–Horn index ({figures['morisita_horn']['grid_um']:g} µm grid)",
            lambda i, j: _cell(mh[CLASS_NAMES[i]][CLASS_NAMES[j]], 2),
        ),
        _matrix_table(f"L function: global MAD test p ({figures['l_function']['null']} null)", l_test),
    ]
    return '<div class="tables">' + "".join(blocks) + "</div>"


def _section(title: str, how: str, image: str) -> str:
    alt = html.escape(title)
    return f'<h2>{alt}</h2><p class="how">{html.escape(how)}</p><img alt="{alt}" src="{image}">'


def report_html(
    result: SpatialResult,
    figures: Mapping[str, Any],
    xy: np.ndarray,
    codes: np.ndarray,
    title: str,
    thumbnail: np.ndarray | None = None,
    label: np.ndarray | None = None,
    diameter_um: float = 7.0,
) -> str:
    """The whole self-contained page."""
    settings = result.settings
    tumour_contact = figures["tumor_with_lymphocyte_within"]
    lf = figures["l_function"]
    meta = (
        f"{figures['nuclei']:,} nuclei · {figures['mpp_um_per_px']:g} µm per pixel · window: "
        f"{html.escape(figures['window']['description'])} ({figures['window']['area_mm2']:.4f} mm²)"
    )
    if tumour_contact["fraction"] is None:
        headline = "No tumour-lymphocyte contact figure: the image has no tumour or no lymphocyte nuclei."
    else:
        headline = (
            f"{_percent(tumour_contact['fraction'])}% of tumour nuclei have a lymphocyte within "
            f"{tumour_contact['radius_um']:g} µm."
        )
    sections = [
        _section(
            "Nuclei by class",
            "The image with every nucleus in its class colour: where each type is, at a glance.",
            plot_nuclei(xy, codes, result.window, thumbnail, label, diameter_um),
        ),
        _section(
            "Density maps",
            f"Nuclei per mm² of each class, smoothed with a {settings.density_bandwidth_um:g} µm Gaussian: "
            "bright areas are where that type is concentrated (each map has its own scale).",
            plot_densities(xy, codes, result.window, settings.density_bandwidth_um),
        ),
        _section(
            "Nearest-neighbour distances",
            "For each nucleus of the row's class, the distance to the nearest nucleus of the column's class; the "
            f"black line is the median, the dashed line the {settings.contact_radius_um:g} µm contact radius.",
            plot_nearest_neighbours(result.distances, settings.contact_radius_um),
        ),
        _section(
            "L functions (Ripley's K, Besag's L)",
            "L(r) − r above the grey envelope: the two types are closer at distance r than if placed at random "
            f"({lf['null']}, {lf['simulations']} simulations); below it: they keep apart. Translation edge "
            "correction; the MAD test p-value judges the whole curve at once.",
            plot_l_functions(result),
        ),
        _section(
            "Neighbourhood enrichment",
            f"z-score of how often a nucleus of the row's class has a neighbour of the column's class within "
            f"{settings.neighbourhood_radius_um:g} µm, against {settings.permutations} random relabellings of the "
            "same positions: red = more often than chance, blue = less.",
            plot_enrichment(result),
        ),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Spatial report: {html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Spatial report: {html.escape(title)}</h1><div class='meta'>{meta}</div>"
        f"{legend_html()}<p><b>{html.escape(headline)}</b></p>"
        "<h2>Figures</h2><p class='how'>Counts and densities per class; distances in µm; every figure is defined "
        "in nucleiseg/spatial.py and stored in spatial.json.</p>"
        + figures_html(figures)
        + "".join(sections)
        + ("</body></html>\n")
    )


def _strict_json(value: Any) -> Any:
    """NaN / infinity -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_paths(out_dir: str | os.PathLike[str], name: str | None = None) -> dict[str, Path]:
    """Where :func:`write_spatial_report` writes: ``spatial.json`` and ``spatial_report.html``, or
    ``<name>_spatial.json`` and ``<name>_spatial.html`` beside the other outputs of image ``name``."""
    out = Path(out_dir)
    if name is None:
        return {"json": out / JSON_NAME, "html": out / HTML_NAME}
    return {"json": out / f"{name}_spatial.json", "html": out / f"{name}_spatial.html"}


def write_spatial_report(
    table: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    mpp: float,
    tissue_mask: np.ndarray | None = None,
    thumbnail: np.ndarray | None = None,
    image_shape: tuple[int, int] | None = None,
    label: np.ndarray | None = None,
    settings: SpatialSettings | None = None,
    title: str | None = None,
    name: str | None = None,
) -> dict[str, Path]:
    """Compute the spatial statistics of a nuclei table and write ``spatial.json`` and ``spatial_report.html``
    into ``out_dir`` (atomically); returns their paths (``json``, ``html``).

    ``mpp``: um per pixel of the table's pixel columns. ``image_shape``: (height, width) px of the full image
    or slide. ``tissue_mask``: boolean raster covering that image (any resolution). ``thumbnail``: an RGB image
    of the whole image (any resolution) drawn under the nuclei. ``label``: the label image (tiles), to colour
    whole nuclei instead of dots. ``title``: defaults to ``name``, else the table's ``image`` name. ``name``:
    write ``<name>_spatial.json`` / ``.html`` (:func:`report_paths`).
    """
    from nucleiseg.io import write_json_atomic, write_text_atomic

    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}")
    if image_shape is None and label is not None:
        image_shape = label.shape[:2]
    xy, codes = table_points(table, float(mpp))
    window = make_window(xy, float(mpp), image_shape, tissue_mask)
    result = spatial_statistics(xy, codes, window, settings)
    if title is None and name is not None:
        title = name
    if title is None:
        names = table["image"].unique().tolist() if "image" in table.columns and len(table) else []
        title = ", ".join(str(n) for n in names[:3]) or "nuclei"
    figures = _strict_json({"image": title, "mpp_um_per_px": float(mpp), **result.figures()})
    diameter = (
        float(np.median(table["equivalent_diameter_um"])) if "equivalent_diameter_um" in table and len(table) else 7.0
    )
    page = report_html(result, figures, xy, codes, title, thumbnail, label, diameter)
    paths = report_paths(out_dir, name)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths["json"], figures)
    write_text_atomic(paths["html"], page)
    return paths


__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "density_maps",
    "figures_html",
    "make_window",
    "report_html",
    "report_paths",
    "table_points",
    "write_spatial_report",
]
