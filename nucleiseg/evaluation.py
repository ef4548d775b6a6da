"""Scoring a trained model on a split: predict the split's original images, then the metrics.

The evaluate stage of the pipeline and the promotion gate (when a champion must be scored again on a
changed split) both use :func:`evaluate_model`, so a model is always scored the same way: from the
*original* images of the split (the predictor applies its own stain normalisation, exactly as in
production), against ``<name>_label.png`` with the ``<name>_other.png`` ignore maps where present.

Two protocols (:data:`PROTOCOLS`, ``eval.protocol``): ``paper`` (the paper's figures, the ignore map's nuclei
ignored; :func:`nucleiseg.metrics.evaluate_image`) and ``hovernet`` (HoVer-Net's CoNSeP protocol, the ignore
map's nuclei a fourth ground-truth type; :func:`nucleiseg.metrics.evaluate_image_hovernet`), or ``both``. A report
holds ``images`` and ``summary`` for the first, a section ``hovernet`` (``images``, ``mean``, ``pooled``,
``n_images``) for the second, and ``protocol``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.io import IMAGE_SUFFIXES

PROTOCOLS: tuple[str, ...] = ("paper", "hovernet", "both")
"""Evaluation protocols: the paper's, HoVer-Net's, or both (module docstring)."""


@dataclass(frozen=True)
class SplitItem:
    name: str
    image: Path
    label: Path
    ignore: Path | None


def split_items(data_dir: str | os.PathLike[str], splits_path: str | os.PathLike[str], split: str,
                ignore_suffix: str = "_other") -> list[SplitItem]:  # fmt: skip
    """The images of one split, from ``splits.json`` and the annotated dataset folder.

    A name in the split without its image or label in ``data_dir`` is an error naming both, and so is a name
    that is not a plain file name (:func:`nucleiseg.outputs.check_name`: outputs are named after it).
    """
    from nucleiseg.labels import label_file
    from nucleiseg.outputs import check_name

    data_dir = Path(data_dir)
    splits = json.loads(Path(splits_path).read_text())
    if split not in splits:
        raise KeyError(f"{splits_path}: no split {split!r} (has {', '.join(splits)})")
    items = []
    for name in splits[split]:
        check_name(name, f"{splits_path}: {split} image")
        image = next((data_dir / f"{name}{s}" for s in IMAGE_SUFFIXES if (data_dir / f"{name}{s}").is_file()), None)
        label = label_file(data_dir, name)  # a 16-bit PNG, or a 32-bit TIFF
        if image is None or label is None:
            raise FileNotFoundError(f"{splits_path}: {split} image {name!r} has no image and label in {data_dir}")
        ignore = data_dir / f"{name}{ignore_suffix}.png" if ignore_suffix else None
        items.append(SplitItem(name, image, label, ignore if ignore is not None and ignore.is_file() else None))
    return items


def _check_protocol(protocol: str) -> tuple[bool, bool]:
    """Whether ``protocol`` asks for the paper's figures and for HoVer-Net's."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    return protocol in ("paper", "both"), protocol in ("hovernet", "both")


def score_image(
    pred: np.ndarray, gt: np.ndarray, other: np.ndarray | None = None, protocol: str = "paper"
) -> dict[str, dict[str, Any]]:
    """One image's figures per protocol asked, ``{"paper": ..., "hovernet": ...}``; ``other`` is the ignore map
    (an instance map: HoVer-Net's protocol counts its nuclei one by one)."""
    from nucleiseg import metrics

    paper, hovernet = _check_protocol(protocol)
    out: dict[str, dict[str, Any]] = {}
    if paper:
        out["paper"] = metrics.evaluate_image(pred, gt, ignore=None if other is None else np.asarray(other) > 0)
    if hovernet:
        out["hovernet"] = metrics.evaluate_image_hovernet(pred, gt, other)
    return out


def assemble_report(scores: Mapping[str, Mapping[str, Any]], protocol: str) -> dict[str, Any]:
    """The evaluation report (module docstring) of :func:`score_image` results by image name."""
    from nucleiseg import metrics

    paper, hovernet = _check_protocol(protocol)
    report: dict[str, Any] = {"protocol": protocol}
    if paper:
        images = {name: figures["paper"] for name, figures in scores.items()}
        report.update(images=images, summary=metrics.summarize(images))
    if hovernet:
        images = {name: figures["hovernet"] for name, figures in scores.items()}
        report["hovernet"] = {"images": images, **metrics.summarize_hovernet(images)}
    return report


def evaluate_model(
    predictor: Any,
    items: list[SplitItem],
    out_dir: str | os.PathLike[str] | None = None,
    on_image: Callable[[str], None] | None = None,
    overlay_dir: str | os.PathLike[str] | None = None,
    protocol: str = "paper",
) -> dict[str, Any]:
    """Predict every item with ``predictor`` (a :class:`nucleiseg.infer.Predictor`) and score it.

    With ``out_dir``, the per-image outputs (label, overlay, GeoJSON, CSV) are written there too; with
    ``overlay_dir``, just the overlays as ``<name>.png`` (a folder of images, for DVC's image plots).
    Returns the report of :func:`assemble_report`: for the paper's protocol ``{"images": {name: figures},
    "summary": figures}`` as :func:`nucleiseg.metrics.summarize`, for HoVer-Net's a section ``hovernet``.
    """
    from nucleiseg.export import overlay, write_outputs
    from nucleiseg.io import read_image, write_image
    from nucleiseg.labels import read_label

    _check_protocol(protocol)  # before the first (slow) prediction
    scores: dict[str, Any] = {}
    for item in items:
        image = read_image(item.image)
        pred = predictor.label(image)
        if out_dir is not None:
            write_outputs(out_dir, item.name, image, pred)
        if overlay_dir is not None:
            write_image(Path(overlay_dir) / f"{item.name}.png", overlay(image, pred))
        other = read_label(item.ignore) if item.ignore is not None else None
        scores[item.name] = score_image(pred, read_label(item.label), other, protocol)
        if on_image is not None:
            on_image(item.name)
    return assemble_report(scores, protocol)


HEADLINE = {
    "all": ("f1", "precision", "recall", "dice", "hausdorff", "aji", "pq", "dq", "sq"),
    "tumor": ("f1", "dice", "hausdorff", "pq"),
    "lymphocyte": ("f1", "dice", "hausdorff", "pq"),
    "stroma": ("f1", "dice", "hausdorff", "pq"),
    "classification": ("accuracy", "accuracy_tumor", "accuracy_lymphocyte", "accuracy_stroma"),
}


def hovernet_headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """HoVer-Net's figures of a report, flat: the per-image means (``dice``, ``aji``, ``dq``, ``sq``, ``pq``) and
    the pooled ones (``f1_d``, ``precision_d``, ``recall_d``, ``type_accuracy``, ``f1_<type>``)."""
    from nucleiseg.metrics import HOVERNET_IMAGE_FIGURES, HOVERNET_POOLED_FIGURES

    section = report["hovernet"]
    return {
        **{k: section["mean"][k] for k in HOVERNET_IMAGE_FIGURES},
        **{k: section["pooled"][k] for k in HOVERNET_POOLED_FIGURES},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """A compact metrics file: the paper's Table 1 and 2 figures plus AJI, PQ and mPQ+ (paper's protocol), and
    under ``hovernet`` HoVer-Net's figures (:func:`hovernet_headline`), for the protocols the report holds."""
    figures: dict[str, Any] = {}
    if "summary" in report:
        summary = report["summary"]
        figures.update({group: {k: summary[group][k] for k in keys} for group, keys in HEADLINE.items()})
        figures["mpq_plus"] = summary["mpq_plus"]
        figures["n_images"] = summary["n_images"]
    if "hovernet" in report:
        figures["hovernet"] = hovernet_headline(report)
        figures.setdefault("n_images", report["hovernet"]["n_images"])
    return figures


def confusion_matrix(report: Mapping[str, Any]) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(counts, class names)`` of a report's confusion matrix (rows true class, columns predicted): the paper's
    detection pairs, or, in a report of HoVer-Net's protocol only, its centroid pairs."""
    from nucleiseg.labels import CLASS_NAMES
    from nucleiseg.metrics import HOVERNET_TYPES

    if "summary" in report:
        return np.asarray(report["summary"]["classification"]["confusion"]), tuple(CLASS_NAMES)
    return np.asarray(report["hovernet"]["pooled"]["type_pairs"]), tuple(HOVERNET_TYPES)


def confusion_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per matched nucleus pair (``actual``, ``predicted`` class names), for DVC's confusion plot (the
    pairs of :func:`confusion_matrix`)."""
    confusion, names = confusion_matrix(report)
    rows = []
    for true_class, counts in enumerate(confusion.astype(np.int64)):
        for pred_class, count in enumerate(counts):
            rows += [{"actual": names[true_class], "predicted": names[pred_class]}] * int(count)
    return rows
