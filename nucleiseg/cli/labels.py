"""Label commands: training targets of a label, and importing public datasets into the label encoding."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ForceOption, app, fail


class ImportFormat(StrEnum):
    consep = "consep"
    pannuke = "pannuke"
    folder = "folder"
    qupath = "qupath"


@app.command("targets")
def targets_command(
    label: Annotated[Path, typer.Argument(help="Label image (16-bit PNG or TIFF, class = id % 3).")],
    out: Annotated[Path, typer.Argument(help="Output 8-bit PNG of the target map.")],
) -> None:
    """Write the 5-class training target of a label as an 8-bit PNG.

    Values: 0 background, 1 tumor inside, 2 lymphocyte inside, 3 stroma inside, 4 contour
    (built exactly as the reference code of Qu et al. does).
    """
    import numpy as np

    from nucleiseg.io import write_image
    from nucleiseg.labels import TARGET_NAMES, LabelError, read_label, targets

    if out.suffix.lower() != ".png":
        fail(f"{out}: the target map is written as a .png file")
    try:
        target = targets(read_label(label))
    except LabelError as exc:
        fail(str(exc))
        return
    try:
        write_image(out, target)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc})")
    counts = np.bincount(target.ravel(), minlength=len(TARGET_NAMES))
    total = max(target.size, 1)
    shares = ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in zip(TARGET_NAMES, counts, strict=True))
    typer.echo(f"{out}: {target.shape[1]}x{target.shape[0]} target map ({shares})")


@app.command("import")
def import_command(
    fmt: Annotated[
        ImportFormat, typer.Argument(metavar="FORMAT", help="Source format: consep, pannuke, folder or qupath.")
    ],
    src: Annotated[Path, typer.Argument(help="Source folder (see `nucleiseg.importers` for each layout).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write <name>.png, <name>_label.png, <name>_other.png.")],
    fold: Annotated[
        str | None, typer.Option("--fold", help="pannuke: tile name prefix (default: the fold's folder name).")
    ] = None,
    class_map: Annotated[
        Path | None,
        typer.Option("--class-map", help="qupath: QuPath class names to classes (default: class_map.yaml)."),
    ] = None,
    origin: Annotated[
        str | None,
        typer.Option(
            "--origin", metavar="X,Y", help="qupath: the images' top-left pixel in the GeoJSON (a slide region)."
        ),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Import a public dataset, or QuPath annotations, into tiles in the paper's label encoding.

    consep: the official CoNSeP release (Train|Test/Images/*.png, Labels/*.mat).

    pannuke: one fold (images.npy, masks.npy), tiles named <fold>_<index>.

    folder: <name>.png, <name>_inst.png (instance map), and <name>.csv (id,class) or one classes.csv
    (image,id,class); class is tumor, lymphocyte, stroma, other or 0, 1, 2.

    qupath: <name>.<png|tif|jpg...> with <name>.geojson or .geojson.gz exported from QuPath (annotations,
    detections, cells' nuclei); classes through the class map; a pixel belongs to an object when its centre
    is inside; overlaps go to the smaller object. A file that fails (unknown class names, a malformed
    feature) is reported and does not stop the others.

    Nuclei of no paper class go to <name>_other.png. Prints the nuclei per class; a tile that fails is
    reported and does not stop the others. OUT_DIR must be apart from SRC; tile files already in OUT_DIR that
    nucleiseg did not write are replaced only with --force (checked before any tile is read).
    """
    if fmt is ImportFormat.qupath:
        if fold is not None:
            fail("--fold applies to the pannuke format only", code=2)
        _import_qupath(src, out_dir, class_map or Path("class_map.yaml"), origin, force)
        return
    if class_map is not None or origin is not None:
        fail("--class-map and --origin apply to the qupath format only", code=2)
    from nucleiseg.importers import SourceError, import_dataset

    options: dict[str, str | bool | None] = {"fold": fold} if fmt is ImportFormat.pannuke else {}
    options["force"] = force
    if fold is not None and fmt is not ImportFormat.pannuke:
        fail("--fold applies to the pannuke format only", code=2)
    try:
        summary = import_dataset(fmt.value, src, out_dir, **options)
    except SourceError as exc:
        if exc.summary is not None and exc.summary.tiles:
            typer.echo(exc.summary.as_text(errors=False))
        fail(str(exc))
        return
    typer.echo(summary.as_text())


def _import_qupath(src: Path, out_dir: Path, class_map_path: Path, origin: str | None, force: bool) -> None:
    """``import qupath``: one line per file (its nuclei, or its error); exit 1 when any file failed."""
    from nucleiseg.qupath import QuPathError, import_qupath, load_class_map

    at = (0, 0)
    if origin is not None:
        try:
            x, y = (int(v) for v in origin.split(","))
        except ValueError:
            fail(f"--origin {origin!r}: expected two integers X,Y (level-0 pixels)", code=2)
            return
        at = (x, y)
    try:
        results = import_qupath(src, out_dir, load_class_map(class_map_path), origin=at, force=force)
    except QuPathError as exc:
        fail(str(exc))
        return
    if not results:
        fail(f"{src}: no <name>.geojson or <name>.geojson.gz found to import")
    failed = [r for r in results if not r.ok]
    for result in results:
        if result.ok and result.report is not None:
            typer.echo(f"{result.name}: {result.report.as_text()}")
    typer.echo(f"qupath: {len(results) - len(failed)} tile(s) written to {out_dir}")
    if failed:
        errors = "\n  ".join(str(r.error) for r in failed)
        fail(f"{len(failed)} of {len(results)} file(s) could not be imported:\n  {errors}")
