"""Weight map command: the loss weights of eq. 2 of Qu et al. for one label image."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import app, fail


@app.command("weightmap")
def weightmap_command(
    label: Annotated[Path, typer.Argument(help="Label image (16-bit PNG or TIFF: 0 background, one id per nucleus).")],
    out: Annotated[Path, typer.Argument(help="Output .npy file (float32, the label's height x width).")],
    w0: Annotated[float, typer.Option("--w0", help="Weight of the term between close nuclei.")] = 10.0,
    sigma: Annotated[float, typer.Option("--sigma", help="Distance scale of the term, in pixels.")] = 5.0,
) -> None:
    """Write the loss weight map w = 1 + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) of a label as a float32 .npy file.

    d1 and d2: distances of each pixel to the boundaries of its nearest and second-nearest nucleus.

    Terms below 1e-4 are cut to 0. The output is replaced only once it is completely written.
    """
    from nucleiseg.io import save_npy_atomic
    from nucleiseg.labels import LabelError, read_label
    from nucleiseg.weightmap import weight_map

    if out.suffix.lower() != ".npy":
        fail(f"{out}: the weight map is written as a .npy file", code=2)
    if not (math.isfinite(sigma) and sigma > 0) or not math.isfinite(w0):
        fail(f"--w0 must be a finite number and --sigma a positive one (got w0={w0}, sigma={sigma})", code=2)
    try:
        weights = weight_map(read_label(label), w0=w0, sigma=sigma)
    except (LabelError, ValueError) as exc:
        fail(str(exc) if isinstance(exc, LabelError) else f"{label}: {exc}")
        return
    try:
        save_npy_atomic(out, weights)
    except OSError as exc:
        fail(f"{out}: cannot write ({exc})")
    share = float((weights > 1.0).mean()) if weights.size else 0.0
    typer.echo(
        f"{out}: {weights.shape[1]}x{weights.shape[0]} weight map (w0={w0:g}, sigma={sigma:g}), "
        f"max {float(weights.max(initial=1.0)):.3f}, {100 * share:.1f}% of pixels above 1"
    )
