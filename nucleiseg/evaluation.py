"""Scoring a trained model on a split: predict the split's original images, then the metrics.

The evaluate stage of the pipeline and the promotion gate (when a champion must be scored again on a
changed split) both use :func:`evaluate_model`, so a model is always scored the same way: from the
*original* images of the split (the predictor applies its own stain normalisation, exactly as in
production), against ``<name>_label.png`` with the ``<name>_other.png`` ignore maps where present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.io import IMAGE_SUFFIXES


@dataclass(frozen=True)
class SplitItem:
    name: str
    image: Path
    label: Path
    ignore: Path | None


def split_items(data_dir: str | os.PathLike[str], splits_path: str | os.PathLike[str], split: str,
                ignore_suffix: str = "_other") -> list[SplitItem]:  # fmt: skip
    """The images of one split, from ``splits.json`` and the annotated dataset folder.

    A name in the split without its image or label in ``data_dir`` is an error naming both.
    """
    data_dir = Path(data_dir)
    splits = json.loads(Path(splits_path).read_text())
    if split not in splits:
        raise KeyError(f"{splits_path}: no split {split!r} (has {', '.join(splits)})")
    items = []
    for name in splits[split]:
        image = next((data_dir / f"{name}{s}" for s in IMAGE_SUFFIXES if (data_dir / f"{name}{s}").is_file()), None)
        label = data_dir / f"{name}_label.png"
        if image is None or not label.is_file():
            raise FileNotFoundError(f"{splits_path}: {split} image {name!r} has no image and label in {data_dir}")
        ignore = data_dir / f"{name}{ignore_suffix}.png" if ignore_suffix else None
        items.append(SplitItem(name, image, label, ignore if ignore is not None and ignore.is_file() else None))
    return items


def evaluate_model(
    predictor: Any,
    items: list[SplitItem],
    out_dir: str | os.PathLike[str] | None = None,
    on_image: Callable[[str], None] | None = None,
    overlay_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Predict every item with ``predictor`` (a :class:`nucleiseg.infer.Predictor`) and score it.

    With ``out_dir``, the per-image outputs (label, overlay, GeoJSON, CSV) are written there too; with
    ``overlay_dir``, just the overlays as ``<name>.png`` (a folder of images, for DVC's image plots).
    Returns ``{"images": {name: figures}, "summary": figures}`` as :func:`nucleiseg.metrics.summarize`.
    """
    from nucleiseg import metrics
    from nucleiseg.export import overlay, write_outputs
    from nucleiseg.io import read_image, write_image
    from nucleiseg.labels import read_label

    per_image: dict[str, Any] = {}
    for item in items:
        image = read_image(item.image)
        pred = predictor.label(image)
        if out_dir is not None:
            write_outputs(out_dir, item.name, image, pred)
        if overlay_dir is not None:
            write_image(Path(overlay_dir) / f"{item.name}.png", overlay(image, pred))
        ignore = read_label(item.ignore) > 0 if item.ignore is not None else None
        per_image[item.name] = metrics.evaluate_image(pred, read_label(item.label), ignore=ignore)
        if on_image is not None:
            on_image(item.name)
    return {"images": per_image, "summary": metrics.summarize(per_image)}


HEADLINE = {
    "all": ("f1", "precision", "recall", "dice", "hausdorff", "aji", "pq", "dq", "sq"),
    "tumor": ("f1", "dice", "hausdorff", "pq"),
    "lymphocyte": ("f1", "dice", "hausdorff", "pq"),
    "stroma": ("f1", "dice", "hausdorff", "pq"),
    "classification": ("accuracy", "accuracy_tumor", "accuracy_lymphocyte", "accuracy_stroma"),
}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The paper's Table 1 and 2 figures plus AJI, PQ and mPQ+ from a report: a compact metrics file."""
    summary = report["summary"]
    figures: dict[str, Any] = {group: {k: summary[group][k] for k in keys} for group, keys in HEADLINE.items()}
    figures["mpq_plus"] = summary["mpq_plus"]
    figures["n_images"] = summary["n_images"]
    return figures


def confusion_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per matched nucleus pair (``actual``, ``predicted`` class names), for DVC's confusion plot."""
    from nucleiseg.labels import CLASS_NAMES

    confusion = np.asarray(report["summary"]["classification"]["confusion"], dtype=np.int64)
    rows = []
    for true_class, counts in enumerate(confusion):
        for pred_class, count in enumerate(counts):
            rows += [{"actual": CLASS_NAMES[true_class], "predicted": CLASS_NAMES[pred_class]}] * int(count)
    return rows
