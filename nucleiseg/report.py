"""The results report: one trained model's test figures in the paper's tables, beside published figures.

Input is what the pipeline already wrote: the evaluation report (``nucleiseg score``: per-image figures and
their summary, :func:`nucleiseg.metrics.summarize`), the training summary and history (``nucleiseg train``),
the settings, and optionally the folder of test overlays. Output is Markdown: Tables 1 and 2 in the paper's
layout (:func:`nucleiseg.ablation.table1`, :func:`~nucleiseg.ablation.table2`), the instance figures (AJI,
PQ, DQ, SQ, mPQ+), the confusion matrix, one line per test image, the training budget, the overlays, and a
comparison with published figures (:data:`REFERENCES`) that says where their definitions differ from ours.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nucleiseg.ablation import table1, table2
from nucleiseg.labels import CLASS_NAMES


@dataclass(frozen=True)
class Reference:
    """Published figures, as ``group.figure`` (``all.f1``, ``tumor.f1``, ``all.aji``...) -> value."""

    label: str
    source: str
    figures: Mapping[str, float]
    caveat: str


REFERENCES: dict[str, Reference] = {
    "hovernet-consep": Reference(
        label="HoVer-Net on CoNSeP",
        source="Graham et al., HoVer-Net, Medical Image Analysis 58 (2019) 101563, Tables 3 and 4 (CoNSeP test set)",
        figures={
            "all.dice": 0.853,
            "all.aji": 0.571,
            "all.pq": 0.547,
            "all.f1": 0.748,
            "tumor.f1": 0.635,
            "lymphocyte.f1": 0.631,
            "stroma.f1": 0.566,
        },
        caveat=(
            "HoVer-Net's figures follow its own definitions: Dice is the pixel-level Dice of all nuclei against "
            "background (ours is the object-level Dice), detection F1 pairs nuclei whose centroids lie within "
            "12 px (ours needs 50% overlap), and the per-class F1 (F_c, epithelial / inflammatory / spindle) "
            "also counts misclassified detections (ours is the detection F1 on the nuclei of one class). They "
            "were measured on the 14 official CoNSeP test tiles, trained on the 27 training tiles with an "
            "ImageNet-pretrained encoder"
        ),
    ),
}
"""Published figures a report can be compared with (``--compare NAME``)."""

_FIGURE_NAMES = {
    "all.f1": "Detection F1, all nuclei",
    "all.dice": "Dice, all nuclei",
    "all.aji": "AJI",
    "all.pq": "PQ",
    "tumor.f1": "F1 tumor (epithelial)",
    "lymphocyte.f1": "F1 lymphocyte (inflammatory)",
    "stroma.f1": "F1 stroma (spindle)",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _lookup(summary: Mapping[str, Any], dotted: str) -> float | None:
    group, figure = dotted.split(".")
    value = summary.get(group, {}).get(figure)
    return None if value is None else float(value)


def instance_table(summary: Mapping[str, Any]) -> str:
    """AJI, PQ, DQ, SQ for all nuclei, PQ per class and mPQ+ (pooled PQ+ per class, averaged)."""
    pq_plus = summary.get("pq_plus", {})
    lines = [
        "| Figure | All nuclei | Tumor | Lymphocyte | Stroma |",
        "|---|---:|---:|---:|---:|",
        f"| AJI | {_fmt(summary['all']['aji'])} | | | |",
        "| PQ | " + " | ".join(_fmt(summary[g]["pq"]) for g in ("all", *CLASS_NAMES)) + " |",
        f"| DQ | {_fmt(summary['all']['dq'])} | | | |",
        f"| SQ | {_fmt(summary['all']['sq'])} | | | |",
        f"| PQ+ (pooled) | mPQ+ {_fmt(summary.get('mpq_plus'))} | "
        + " | ".join(_fmt(pq_plus.get(c)) for c in CLASS_NAMES)
        + " |",
    ]
    return "\n".join(lines)


def confusion_table(summary: Mapping[str, Any]) -> str:
    """The 3x3 confusion matrix of the detected nuclei: counts and, in brackets, the share of the row."""
    confusion = summary["classification"]["confusion"]
    lines = [
        "| True \\ predicted | " + " | ".join(c.capitalize() for c in CLASS_NAMES) + " | Detected |",
        "|---|---:|---:|---:|---:|",
    ]
    for true_class, counts in enumerate(confusion):
        total = sum(counts)
        cells = [f"{n} ({100 * n / total:.1f}%)" if total else str(n) for n in counts]
        lines.append(f"| {CLASS_NAMES[true_class].capitalize()} | " + " | ".join(cells) + f" | {total} |")
    return "\n".join(lines)


def per_image_table(images: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per test image: nuclei in the ground truth and the prediction, and its main figures."""
    lines = [
        "| Image | Nuclei (truth) | Nuclei (predicted) | F1 | Dice | Hausdorff | AJI | PQ | Accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(images):
        a = images[name]["all"]
        acc = images[name]["classification"]["accuracy"]
        lines.append(
            f"| {name} | {a['n_gt']} | {a['n_pred']} | {_fmt(a['f1'])} | {_fmt(a['dice'])} | "
            f"{_fmt(a['hausdorff'], 2)} | {_fmt(a['aji'])} | {_fmt(a['pq'])} | {_fmt(acc)} |"
        )
    return "\n".join(lines)


def comparison_table(summary: Mapping[str, Any], reference: Reference) -> str:
    """Our figures beside one reference's, for the figures it published."""
    lines = [f"| Figure | This model | {reference.label} |", "|---|---:|---:|"]
    for dotted, value in reference.figures.items():
        lines.append(f"| {_FIGURE_NAMES.get(dotted, dotted)} | {_fmt(_lookup(summary, dotted))} | {value:.3f} |")
    return "\n".join(lines)


def training_lines(train_summary: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> list[str]:
    """The budget and the settings that decide it, from the training summary and the flat settings."""
    s = settings
    lines = [
        f"- Model `{s.get('model.name')}` (encoder `{s.get('model.encoder')}`, weights asked: "
        f"`{s.get('model.encoder_weights')}`), weighted cross-entropy (w0 {s.get('loss.w0')}, sigma "
        f"{s.get('loss.sigma')}) + {s.get('train.beta')} x perceptual loss.",
        f"- Schedule: {s.get('train.epochs')} epoch(s) of {s.get('train.steps_per_epoch') or 'all'} step(s), batch "
        f"{s.get('train.batch_size')} of {s.get('augmentation.crop')}x{s.get('augmentation.crop')} crops, Adam lr "
        f"{s.get('train.lr')}, weight decay {s.get('train.weight_decay')}, seed {s.get('train.seed')}.",
        f"- Inference: tiles of {s.get('infer.tile')} px with {s.get('infer.overlap')} px overlap, TTA "
        f"{'on' if s.get('infer.tta') else 'off'}; post-processing min area {s.get('post.min_area')} px, "
        f"dilation radius {s.get('post.radius')}.",
    ]
    if train_summary:
        t = train_summary
        minutes = float(t.get("seconds", 0.0)) / 60
        best = t.get("best_score")
        lines.append(
            f"- Trained {t.get('epochs')} epoch(s) in {minutes:.1f} min; best validation {t.get('val_metric')} "
            f"{_fmt(best)} at epoch {t.get('best_epoch')} (that checkpoint is the one scored); encoder "
            f"{'ImageNet-pretrained' if t.get('encoder_pretrained') else 'randomly initialised'}."
        )
    return lines


def notes(summary: Mapping[str, Any], train_summary: Mapping[str, Any] | None) -> list[str]:
    """What a reader needs to read the figures (computed, not written by hand)."""
    out = [
        "Figures are means over the test images, except classification and mPQ+, pooled over all detected "
        "nuclei. Hausdorff distances are in pixels (lower is better). `n/a`: undefined on this split.",
    ]
    skipped = {g: summary[g].get("nan_skipped", {}) for g in ("all", *CLASS_NAMES)}
    undefined = [f"{g} {fig} ({n})" for g, figs in skipped.items() for fig, n in figs.items() if n and fig != "sq"]
    if undefined:
        out.append("Undefined per-image figures skipped in the means (image count): " + ", ".join(undefined[:12]) + ".")
    if train_summary is not None and not train_summary.get("encoder_pretrained", True):
        out.append(
            "The encoder was asked for ImageNet weights but could not load them (no network and none in the "
            "local caches), so it trained from random weights; the paper's encoder was ImageNet-pretrained."
        )
    if summary.get("n_ignored"):
        n = summary["n_ignored"]
        out.append(f"{n} predicted nuclei lay at least half on ignored (`other`) nuclei and were dropped.")
    return out


def overlay_lines(overlay_dir: Path | None, report_path: Path, limit: int = 4) -> list[str]:
    """Markdown images of up to ``limit`` overlays, linked relative to the report."""
    if overlay_dir is None or not overlay_dir.is_dir():
        return []
    files = sorted(p for p in overlay_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    lines = [
        f"Nuclei outlined on test images (red tumor, green lymphocyte, blue stroma), from `{overlay_dir}`:",
        "",
    ]
    for path in files:
        rel = os.path.relpath(path, report_path.parent)
        lines.append(f"![{path.stem}]({rel})")
    return lines


def render(
    evaluation: Mapping[str, Any],
    settings: Mapping[str, Any],
    report_path: str | os.PathLike[str],
    train_summary: Mapping[str, Any] | None = None,
    title: str = "Results",
    dataset: str | None = None,
    compare: Sequence[str] = (),
    overlay_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The Markdown report (module docstring). ``compare`` names entries of :data:`REFERENCES`."""
    unknown = [name for name in compare if name not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference(s) {', '.join(unknown)}; known: {', '.join(REFERENCES)}")
    summary = evaluation["summary"]
    images = evaluation.get("images", {})
    row = {"key": "full", "label": f"{settings.get('model.name')} (this model)", "test": summary}
    split = evaluation.get("split", "test")
    lines = [
        f"# {title}",
        "",
        f"Model `{evaluation.get('model', '?')}` scored on the {split} split"
        + (f" of `{dataset}`" if dataset else "")
        + f": {len(images)} image(s) ({', '.join(sorted(images))}).",
        "",
        "## Table 1: segmentation",
        "",
        table1([row]),
        "",
        "## Table 2: classification accuracy of the detected nuclei",
        "",
        table2([row]),
        "",
        "## Instance figures: AJI, PQ, mPQ+",
        "",
        instance_table(summary),
        "",
    ]
    for name in compare:
        reference = REFERENCES[name]
        lines += [
            f"## Beside {reference.label}",
            "",
            comparison_table(summary, reference),
            "",
            f"Source: {reference.source}. {reference.caveat}.",
            "",
        ]
    lines += [
        "## Confusion matrix (detected nuclei)",
        "",
        confusion_table(summary),
        "",
        "## Per image",
        "",
        per_image_table(images),
        "",
        "## Training",
        "",
        *training_lines(train_summary, settings),
        "",
    ]
    overlays = overlay_lines(Path(overlay_dir) if overlay_dir is not None else None, Path(report_path))
    if overlays:
        lines += ["## Overlays", "", *overlays, ""]
    lines += ["## Notes", "", *(f"- {line}" for line in notes(summary, train_summary)), ""]
    return "\n".join(lines)
