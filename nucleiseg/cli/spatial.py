"""``nucleiseg spatial``: the spatial statistics of the nucleus types of one image, as JSON and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ParamsOption, SetOption, app, fail, read_params

DEFAULT_PARAMS = Path("params.yaml")
TABLE_SUFFIXES = (".csv", ".parquet")


@app.command("spatial")
def spatial_command(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT", help="A per-nucleus table (.csv / .parquet, e.g. NAME_nuclei.csv) or a label image."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: spatial.json and spatial_report.html.")],
    mpp: Annotated[
        float | None,
        typer.Option(
            "--mpp", min=1e-6, help="Micrometres per pixel (default: the table's um_per_px, else spatial.mpp)."
        ),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option("--image", help="The H&E image: drawn under the nuclei, and measured when INPUT is a label."),
    ] = None,
    tissue_mask: Annotated[
        Path | None,
        typer.Option("--tissue-mask", help="Tissue mask image covering the image (non-zero = tissue), any size."),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
) -> None:
    """Counts, densities per mm^2, nearest-neighbour distances, cross-type L functions with envelopes,
    neighbourhood enrichment and Morisita-Horn co-localisation of tumour, lymphocyte and stroma nuclei.

    All distances in um (nucleiseg/spatial.py defines every figure); settings from the spatial section of the
    params. Densities are per mm^2 of the tissue mask when one is given, else of the image (or of the nuclei's
    bounding box when only a table is given).
    """
    settings = read_params(params if (params != DEFAULT_PARAMS or params.is_file()) else None, set_)  # type: ignore[arg-type]
    from nucleiseg.io import ImageReadError, read_image, read_raw
    from nucleiseg.labels import LabelError, read_label
    from nucleiseg.measure import nuclei_centroids, nuclei_table, read_table, write_table
    from nucleiseg.spatial import settings_from
    from nucleiseg.spatial_report import write_spatial_report

    if not input_path.exists():
        fail(f"{input_path}: no such file")
    try:
        rgb = read_image(image) if image is not None else None
        mask = (read_raw(tissue_mask) > 0) if tissue_mask is not None else None
    except (ImageReadError, OSError, ValueError) as exc:
        fail(str(exc))
        return
    if mask is not None and mask.ndim == 3:
        mask = mask.any(axis=2)
    label = None
    if input_path.suffix.lower() in TABLE_SUFFIXES:
        try:
            table = read_table(input_path)
        except ValueError as exc:
            fail(str(exc))
            return
        if mpp is None and "um_per_px" in table.columns and len(table):
            mpp = float(table["um_per_px"].iloc[0])
    else:
        try:
            label = read_label(input_path)
        except (LabelError, ImageReadError, OSError, ValueError) as exc:
            fail(str(exc))
            return
        mpp = mpp if mpp is not None else settings.spatial.mpp
        if rgb is not None and rgb.shape[:2] != label.shape:
            fail(
                f"{image}: {rgb.shape[1]}x{rgb.shape[0]} px, but the label {input_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        name = input_path.stem.removesuffix("_label")
        table = (
            nuclei_table(label, rgb, mpp=mpp, image_name=name)
            if rgb is not None
            else nuclei_centroids(label, mpp=mpp, image_name=name)
        )
    mpp = mpp if mpp is not None else settings.spatial.mpp
    image_shape = label.shape if label is not None else (rgb.shape[:2] if rgb is not None else None)
    if mask is not None and image_shape is None:
        fail("--tissue-mask needs the image it covers: give --image (or a label image as INPUT)")
    try:
        paths = write_spatial_report(
            table, out, mpp=mpp, tissue_mask=mask, thumbnail=rgb, image_shape=image_shape, label=label,
            settings=settings_from(settings.spatial.model_dump()),
        )  # fmt: skip
    except ValueError as exc:
        fail(f"{input_path}: {exc}")
        return
    if label is not None:
        write_table(table, out / "nuclei.csv")
    counts = table["class"].value_counts()
    shares = ", ".join(f"{c} {int(counts.get(c, 0))}" for c in ("tumor", "lymphocyte", "stroma"))
    typer.echo(f"{len(table)} nuclei ({shares}) at {mpp:g} um/px: {paths['html']}, {paths['json']}")
