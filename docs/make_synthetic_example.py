"""Regenerate ``docs/synthetic_example.png``: a synthetic tile beside its class-coloured outlines.

Outlines in the class colours of :mod:`nucleiseg.palette` (Okabe-Ito: orange tumor, sky-blue lymphocyte,
bluish-green stroma), as every overlay of the project draws them.

    .venv/bin/python docs/make_synthetic_example.py [--seed 0] [--size 384]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from nucleiseg.io import write_image
from nucleiseg.palette import CLASS_COLORS
from nucleiseg.synth import synth_tile

OUTLINE_COLOURS = np.array(CLASS_COLORS, np.uint8)  # tumor, lymphocyte, stroma


def outlined(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``image`` with the inner boundary of every nucleus drawn in its class colour."""
    out = image.copy()
    edge = find_boundaries(label, mode="inner")
    out[edge] = OUTLINE_COLOURS[label[edge] % 3]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synthetic_example.png"))
    args = parser.parse_args()
    image, label = synth_tile(args.seed, args.size)
    gap = np.full((args.size, 8, 3), 255, np.uint8)
    write_image(args.out, np.concatenate([image, gap, outlined(image, label)], axis=1))
    ids = np.unique(label[label > 0])
    counts = np.bincount(ids % 3, minlength=3)
    print(f"wrote {args.out} ({counts[0]} tumor, {counts[1]} lymphocyte, {counts[2]} stroma nuclei)")


if __name__ == "__main__":
    main()
