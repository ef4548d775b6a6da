"""Static figures (PNG) of evaluation results: the confusion matrix of the classes of detected nuclei.

The confusion matrix counts, for every detected nucleus matched to a ground-truth nucleus, its true class (row)
against its predicted class (column); unmatched nuclei are not in it (they are the detection errors of F1). Each
cell shows the count and its share of the row (the recall of the row's class among its detected nuclei). Cells are
shaded by that share on matplotlib's ``cividis`` scale, designed to read the same under red-green colour-vision
deficiency and in greyscale; the class names carry the class colours of :mod:`nucleiseg.palette` (Okabe-Ito), the
same as the overlays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from nucleiseg.io import atomic_path


def confusion_png(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Classes of the detected nuclei",
) -> None:
    """Draw the confusion ``matrix`` (rows: true class, columns: predicted, in ``class_names`` order) to ``path``.

    Classes of :data:`nucleiseg.labels.CLASS_NAMES` get their palette colour on the axes; others (HoVer-Net's
    ``other``) stay black. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nucleiseg.labels import CLASS_NAMES
    from nucleiseg.palette import CLASS_HEX

    counts = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {n} classes")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    fig, ax = plt.subplots(figsize=(1.6 * n + 2.4, 1.4 * n + 1.6))
    image = ax.imshow(share, cmap="cividis", vmin=0.0, vmax=1.0)
    for row in range(n):
        for col in range(n):
            # dark text on the light (yellow) end of cividis, white on the dark (blue) end
            colour = "black" if share[row, col] > 0.6 else "white"
            ax.text(col, row, f"{int(counts[row, col])}\n{share[row, col]:.0%}", ha="center", va="center",
                    color=colour, fontsize=10)  # fmt: skip
    ax.set_xticks(range(n), [f"{name}\n(n={int(counts[:, i].sum())})" for i, name in enumerate(class_names)])
    ax.set_yticks(range(n), [f"{name}\n(n={int(totals[i, 0])})" for i, name in enumerate(class_names)])
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, name in zip(labels, class_names, strict=True):
            if name in CLASS_NAMES:
                label.set_color(CLASS_HEX[CLASS_NAMES.index(name)])
                label.set_fontweight("bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's detected nuclei")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


__all__ = ["confusion_png"]
