"""``nucleiseg synth``: write the embedded synthetic H&E dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import app, fail


@app.command("synth")
def synth_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write <name>.png and <name>_label.png into.")],
    n_images: Annotated[int, typer.Option("--n-images", min=0, help="Number of tiles.")] = 12,
    size: Annotated[int, typer.Option("--size", min=16, help="Tile side in px (40x, about 0.25 µm/px).")] = 512,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Tile i depends only on (seed, i).")] = 0,
    class_fractions: Annotated[
        tuple[float, float, float],
        typer.Option("--class-fractions", help="Expected share of tumor, lymphocyte, stroma nuclei."),
    ] = (0.365, 0.26, 0.375),
    density: Annotated[
        float, typer.Option("--density", min=0, help="Expected nuclei per 1000x1000 px (CoNSeP: about 560).")
    ] = 560.0,
    prefix: Annotated[str, typer.Option("--prefix", help="File name prefix: <prefix>_000.png, ...")] = "synth",
) -> None:
    """Write synthetic 40x H&E tiles with 16-bit labels (id % 3: 0 tumor, 1 lymphocyte, 2 stroma).

    Deterministic: the same seed writes the same bytes, and tile i depends only on the seed and i.
    """
    import numpy as np

    from nucleiseg.synth import write_dataset

    try:
        paths = write_dataset(
            out_dir, n_images, size, seed, prefix=prefix, class_fractions=class_fractions, density=density
        )
    except OSError as exc:
        fail(f"{out_dir}: cannot write the dataset ({exc})")
        return
    except ValueError as exc:  # a bad option; nothing was written
        fail(str(exc), code=2)
        return
    from nucleiseg.labels import read_label

    counts = np.zeros(3, int)
    for path in paths:
        ids = np.unique(read_label(path.with_name(f"{path.stem}_label.png")))
        counts += np.bincount(ids[ids > 0] % 3, minlength=3)
    typer.echo(
        f"wrote {len(paths)} tiles of {size}x{size} to {out_dir} "
        f"({counts[0]} tumor, {counts[1]} lymphocyte, {counts[2]} stroma nuclei)"
    )
