"""The results report: one trained model's test figures in the paper's tables, beside published figures.

Input is what the pipeline already wrote: the evaluation report (``nucleiseg score``: per-image figures and
their summary, :func:`nucleiseg.metrics.summarize`, and/or the ``hovernet`` section of HoVer-Net's protocol,
:func:`nucleiseg.metrics.summarize_hovernet`), the training summary and history (``nucleiseg train``), the
settings, and optionally the folder of test overlays. Output is Markdown. For the paper's protocol: Tables 1 and
2 in the paper's layout (:func:`nucleiseg.ablation.table1`, :func:`~nucleiseg.ablation.table2`), the instance
figures (AJI, PQ, DQ, SQ, mPQ+), the confusion matrix, one line per test image. For HoVer-Net's protocol: its
figures, the centroid pairs by type, one line per test image. Then the comparison with published figures
(:data:`REFERENCES`): in HoVer-Net's protocol when the evaluation holds it (same definitions; a note says what
else differs), otherwise beside our paper-protocol figures with a note on where the definitions differ. Then the
training budget and the overlays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nucleiseg.ablation import table1, table2
from nucleiseg.evaluation import hovernet_headline
from nucleiseg.labels import CLASS_NAMES
from nucleiseg.metrics import HOVERNET_RADIUS, HOVERNET_TYPES


@dataclass(frozen=True)
class Published:
    """One method's published figures in HoVer-Net's protocol, keyed as the ``hovernet`` headline of
    :func:`nucleiseg.evaluation.hovernet_headline` (``dice``, ``pq``, ``f1_d``, ``f1_tumor``...); a figure the
    method did not publish is absent."""

    label: str
    source: str
    figures: Mapping[str, float]


@dataclass(frozen=True)
class Reference:
    """Published figures, as ``group.figure`` (``all.f1``, ``tumor.f1``, ``all.aji``...) -> value, set beside
    our paper-protocol figures with ``caveat``; and ``same_protocol`` rows, set beside our HoVer-Net-protocol
    figures with ``differences`` (what differs besides the definitions)."""

    label: str
    source: str
    figures: Mapping[str, float]
    caveat: str
    same_protocol: tuple[Published, ...] = ()
    differences: str = ""


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
        same_protocol=(
            Published(
                label="HoVer-Net (Graham et al., 2019)",
                source="Graham et al., HoVer-Net, Medical Image Analysis 58 (2019) 101563, Tables 3 and 4",
                figures={
                    "dice": 0.853,
                    "aji": 0.571,
                    "dq": 0.702,
                    "sq": 0.778,
                    "pq": 0.547,
                    "f1_d": 0.748,
                    "f1_tumor": 0.635,
                    "f1_lymphocyte": 0.631,
                    "f1_stroma": 0.566,
                },
            ),
            Published(
                label="CellViT++ (SAM-H, 2025)",
                source="Hörst et al., CellViT++, arXiv:2501.05269 (2025), CoNSeP, SAM-H encoder",
                figures={"pq": 0.548, "f1_d": 0.772, "f1_tumor": 0.683},
            ),
        ),
        differences=(
            "The published figures were measured on the 14 official CoNSeP test tiles, with models trained on the "
            "27 training tiles for a GPU budget from pretrained encoders (HoVer-Net: ImageNet; CellViT++: SAM-H). "
            "Ours come from the held-out tiles of our own split of the training tiles, with the training budget "
            "and encoder weights given under Training"
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


_HOVERNET_COLUMNS = {
    "dice": "Dice",
    "aji": "AJI",
    "dq": "DQ",
    "sq": "SQ",
    "pq": "PQ",
    "f1_d": "F1d",
    "f1_tumor": "F tumor (epithelial)",
    "f1_lymphocyte": "F lymphocyte (inflammatory)",
    "f1_stroma": "F stroma (spindle)",
}


def hovernet_comparison_table(figures: Mapping[str, Any], rows: Sequence[Published], label: str) -> str:
    """Our HoVer-Net-protocol figures (:func:`nucleiseg.evaluation.hovernet_headline`) beside published rows;
    a figure a method did not publish is an empty cell."""
    lines = [
        "| Method | " + " | ".join(_HOVERNET_COLUMNS.values()) + " |",
        "|---" + "|---:" * len(_HOVERNET_COLUMNS) + "|",
    ]
    lines.append(f"| {label} | " + " | ".join(_fmt(figures.get(k)) for k in _HOVERNET_COLUMNS) + " |")
    for row in rows:
        cells = (f"{row.figures[k]:.3f}" if k in row.figures else "" for k in _HOVERNET_COLUMNS)
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hovernet_table(section: Mapping[str, Any]) -> str:
    """HoVer-Net's figures: per-image means and the figures pooled over all nuclei."""
    mean, pooled = section["mean"], section["pooled"]
    cols = [("Dice", mean["dice"]), ("AJI", mean["aji"]), ("DQ", mean["dq"]), ("SQ", mean["sq"]), ("PQ", mean["pq"])]
    cols += [("F1d", pooled["f1_d"]), ("Precision", pooled["precision_d"]), ("Recall", pooled["recall_d"])]
    cols += [("Type accuracy", pooled["type_accuracy"])]
    cols += [(f"F {name}", pooled[f"f1_{name}"]) for name in HOVERNET_TYPES]
    return "\n".join(
        [
            "| " + " | ".join(name for name, _ in cols) + " |",
            "|" + "---:|" * len(cols),
            "| " + " | ".join(_fmt(value) for _, value in cols) + " |",
        ]
    )


def hovernet_pairs_table(pooled: Mapping[str, Any]) -> str:
    """Centroid pairs by ground-truth type (rows) and predicted type (columns), and the unpaired nuclei."""
    pairs, missed, extra = pooled["type_pairs"], pooled["unpaired_true"], pooled["unpaired_pred"]
    # Our models never predict "other": its column is shown only if a prediction ever has that type.
    shown = [c for c, name in enumerate(HOVERNET_TYPES) if name != "other" or sum(row[c] for row in pairs) or extra[c]]
    lines = [
        "| True \\ predicted | " + " | ".join(HOVERNET_TYPES[c].capitalize() for c in shown) + " | Unpaired (FN) |",
        "|---|" + "---:|" * (len(shown) + 1),
    ]
    for t, name in enumerate(HOVERNET_TYPES):
        lines.append(f"| {name.capitalize()} | " + " | ".join(str(pairs[t][c]) for c in shown) + f" | {missed[t]} |")
    lines.append("| Unpaired (FP) | " + " | ".join(str(extra[c]) for c in shown) + " | |")
    return "\n".join(lines)


def hovernet_per_image_table(images: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per test image in HoVer-Net's protocol (F1d of the image alone, for orientation)."""
    lines = [
        "| Image | Nuclei (truth) | of which other | Nuclei (predicted) | Dice | AJI | DQ | SQ | PQ | F1d (image) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(images):
        h = images[name]
        f1_d = 2 * h["tp_d"] / (2 * h["tp_d"] + h["fp_d"] + h["fn_d"]) if h["n_true"] + h["n_pred"] else None
        lines.append(
            f"| {name} | {h['n_true']} | {h['n_other']} | {h['n_pred']} | {_fmt(h['dice'])} | {_fmt(h['aji'])} | "
            f"{_fmt(h['dq'])} | {_fmt(h['sq'])} | {_fmt(h['pq'])} | {_fmt(f1_d)} |"
        )
    return "\n".join(lines)


def hovernet_notes(section: Mapping[str, Any], mpp: float | None = None) -> list[str]:
    """How to read HoVer-Net's figures (computed from the section); ``mpp``: micrometres per pixel of the tiles,
    to give the pairing radius in um too."""
    mean, pooled = section["mean"], section["pooled"]
    radius = f"{HOVERNET_RADIUS:g} px" + (f" ({HOVERNET_RADIUS * mpp:g} um at {mpp:g} um/px)" if mpp else "")
    out = [
        "Definitions as HoVer-Net's `compute_stats.py` (nucleiseg.metrics): Dice is the binary Dice of all nuclei "
        "against background; AJI, DQ, SQ, PQ are computed per image and averaged; F1d, type accuracy and F per "
        f"type are pooled over all nuclei, pairing centroids one-to-one (Hungarian) within {radius}; "
        "F_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_dc + FN_dc).",
        f"The ignore map's nuclei join the ground truth as type `other` ({mean['n_other']} of {mean['n_true']} "
        f"nuclei); {mean['n_pred']} predicted; {pooled['tp_d']} paired, {pooled['fp_d']} unpaired predictions, "
        f"{pooled['fn_d']} unpaired ground truth.",
    ]
    if mean["n_other"]:
        out.append(
            "This model predicts three classes, never `other`: F other is 0 by construction, and pairs with an "
            "`other` ground truth count as wrong in type accuracy (as in HoVer-Net's figures, whose model had the "
            "class)."
        )
    undefined = [f"{fig} ({n})" for fig, n in mean.get("nan_skipped", {}).items() if n]
    if undefined:
        out.append("Images without any nucleus, skipped in the means: " + ", ".join(undefined) + ".")
    return out


def training_lines(train_summary: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> list[str]:
    """The budget and the settings that decide it, from the training summary and the flat settings."""
    s = settings
    lines = [
        f"- Model `{s.get('model.name')}` (encoder `{s.get('model.encoder')}`, weights asked: "
        f"`{s.get('model.encoder_weights')}`), weighted cross-entropy (w0 {s.get('loss.w0')}, sigma "
        f"{s.get('loss.sigma')}) + {s.get('train.beta')} x perceptual loss.",
        f"- Schedule: {s.get('train.epochs')} epoch(s) of {s.get('train.steps_per_epoch') or 'all'} step(s), batch "
        f"{s.get('train.batch_size')} of {s.get('augmentation.crop')}x{s.get('augmentation.crop')} crops, Adam lr "
        f"{s.get('train.lr')} ({s.get('train.schedule', 'constant')}"
        + (f", {s.get('train.warmup')} warm-up" if s.get("train.schedule", "constant") != "constant" else "")
        + f"), weight decay {s.get('train.weight_decay')}, class weights {s.get('loss.class_weights', 'none')}, "
        f"stain normalisation {s.get('stain.method')}, seed {s.get('train.seed')}.",
        f"- Inference: tiles of {s.get('infer.tile')} px with {s.get('infer.overlap')} px overlap, TTA "
        f"{'on' if s.get('infer.tta') else 'off'}; post-processing {_post_description(s)}.",
    ]
    if train_summary:
        t = train_summary
        minutes = float(t.get("seconds", 0.0)) / 60
        best = t.get("best_score")
        chosen = (
            f"the last epoch's checkpoint is the one scored (validation {t.get('val_metric')} {_fmt(best)})"
            if t.get("select") == "last"
            else f"best validation {t.get('val_metric')} {_fmt(best)} at epoch {t.get('best_epoch')} (that "
            "checkpoint is the one scored)"
        )
        lines.append(
            f"- Trained {t.get('epochs')} epoch(s) in {minutes:.1f} min; {chosen}; encoder "
            f"{'ImageNet-pretrained' if t.get('encoder_pretrained') else 'randomly initialised'}."
        )
    return lines


def _post_description(s: Mapping[str, Any]) -> str:
    method, classify = s.get("post.method", "paper"), s.get("post.classify", "vote")
    how = (
        "connected components of the argmax (the paper's)"
        if method == "paper"
        else f"watershed (nucleus pixels: inside > {s.get('post.mask_threshold')}, markers: inside - contour > "
        f"{s.get('post.marker_threshold')})"
    )
    vote = "pixel majority vote" if classify == "vote" else "summed class probability"
    return f"{how}, class by {vote}, min area {s.get('post.min_area')} px, dilation radius {s.get('post.radius')}"


def notes(summary: Mapping[str, Any] | None, train_summary: Mapping[str, Any] | None) -> list[str]:
    """What a reader needs to read the figures (computed, not written by hand); ``summary``: the paper's
    protocol, None when the report does not show it."""
    out = []
    if summary is not None:
        out.append(
            "Paper's protocol: figures are means over the test images, except classification and mPQ+, pooled over "
            "all detected nuclei. Hausdorff distances are in pixels (lower is better). `n/a`: undefined on this split."
        )
        skipped = {g: summary[g].get("nan_skipped", {}) for g in ("all", *CLASS_NAMES)}
        undefined = [f"{g} {fig} ({n})" for g, figs in skipped.items() for fig, n in figs.items() if n and fig != "sq"]
        if undefined:
            out.append(
                "Undefined per-image figures skipped in the means (image count): " + ", ".join(undefined[:12]) + "."
            )
    if train_summary is not None and not train_summary.get("encoder_pretrained", True):
        out.append(
            "The encoder was asked for ImageNet weights but could not load them (no network and none in the "
            "local caches), so it trained from random weights; the paper's encoder was ImageNet-pretrained."
        )
    if summary is not None and summary.get("n_ignored"):
        n = summary["n_ignored"]
        out.append(
            f"Paper's protocol: {n} predicted nuclei lay at least half on ignored (`other`) nuclei and were dropped."
        )
    return out


def colour_legend() -> str:
    """The class colours in words, as the overlays draw them (:mod:`nucleiseg.palette`)."""
    from nucleiseg.labels import CLASS_NAMES
    from nucleiseg.palette import CLASS_HEX

    names = ("orange", "sky blue", "bluish green")  # Okabe-Ito's names of CLASS_COLORS
    return ", ".join(f"{n} ({h}) {c}" for n, h, c in zip(names, CLASS_HEX, CLASS_NAMES, strict=True))


def overlay_lines(overlay_dir: Path | None, report_path: Path, limit: int = 4) -> list[str]:
    """Markdown images of up to ``limit`` overlays, linked relative to the report."""
    if overlay_dir is None or not overlay_dir.is_dir():
        return []
    files = sorted(p for p in overlay_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    lines = [
        f"Nuclei outlined on test images ({colour_legend()}), from `{overlay_dir}`:",
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
    protocol: str = "both",
) -> str:
    """The Markdown report (module docstring). ``compare`` names entries of :data:`REFERENCES`; ``protocol``
    (``paper``, ``hovernet``, ``both``) which figures to show, of those the evaluation holds."""
    unknown = [name for name in compare if name not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference(s) {', '.join(unknown)}; known: {', '.join(REFERENCES)}")
    if protocol not in ("paper", "hovernet", "both"):
        raise ValueError(f"unknown evaluation protocol {protocol!r} (known: paper, hovernet, both)")
    summary = evaluation.get("summary") if protocol in ("paper", "both") else None
    hovernet = evaluation.get("hovernet") if protocol in ("hovernet", "both") else None
    if summary is None and hovernet is None:
        raise ValueError(f"the evaluation holds no figures of protocol {protocol!r} (it has: "
                         f"{evaluation.get('protocol', 'paper')}); score it again with that eval.protocol")  # fmt: skip
    missing = [
        f"The evaluation holds no {name} figures (scored with protocol `{evaluation.get('protocol', 'paper')}`); "
        f"`nucleiseg score --protocol {key}` adds them."
        for key, name, wanted, held in (
            ("paper", "paper-protocol", protocol in ("paper", "both"), summary is not None),
            ("hovernet", "HoVer-Net-protocol", protocol in ("hovernet", "both"), hovernet is not None),
        )
        if wanted and not held
    ]
    images = evaluation.get("images") if summary is not None else None
    names = sorted(images if images is not None else hovernet["images"])
    split = evaluation.get("split", "test")
    lines = [
        f"# {title}",
        "",
        f"Model `{evaluation.get('model', '?')}` scored on the {split} split"
        + (f" of `{dataset}`" if dataset else "")
        + f": {len(names)} image(s) ({', '.join(names)}).",
        "",
    ]
    if summary is not None:
        row = {"key": "full", "label": f"{settings.get('model.name')} (this model)", "test": summary}
        lines += [
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
    if hovernet is not None:
        lines += [
            "## HoVer-Net's protocol",
            "",
            hovernet_table(hovernet),
            "",
            *(f"- {line}" for line in hovernet_notes(hovernet, settings.get("model.mpp"))),
            "",
        ]
    for name in compare:
        reference = REFERENCES[name]
        lines += [f"## Beside {reference.label}", ""]
        if hovernet is not None and reference.same_protocol:
            ours = hovernet_headline({"hovernet": hovernet})
            sources = "; ".join(row.source for row in reference.same_protocol)
            lines += [
                hovernet_comparison_table(ours, reference.same_protocol, f"{settings.get('model.name')} (this model)"),
                "",
                f"All rows in HoVer-Net's protocol (same definitions; an empty cell: not published). Sources: "
                f"{sources}. {reference.differences}.",
                "",
            ]
        elif summary is not None:
            lines += [
                comparison_table(summary, reference),
                "",
                f"Source: {reference.source}. {reference.caveat}.",
                "",
            ]
    if summary is not None:
        lines += ["## Confusion matrix (detected nuclei)", "", confusion_table(summary), ""]
    if hovernet is not None:
        lines += [
            "## Centroid pairs by type (HoVer-Net's protocol, 12 px)",
            "",
            hovernet_pairs_table(hovernet["pooled"]),
            "",
        ]
    if summary is not None:
        lines += ["## Per image", "", per_image_table(images or {}), ""]
    if hovernet is not None:
        lines += ["## Per image, HoVer-Net's protocol", "", hovernet_per_image_table(hovernet["images"]), ""]
    lines += ["## Training", "", *training_lines(train_summary, settings), ""]
    overlays = overlay_lines(Path(overlay_dir) if overlay_dir is not None else None, Path(report_path))
    if overlays:
        lines += ["## Overlays", "", *overlays, ""]
    lines += ["## Notes", "", *(f"- {line}" for line in [*notes(summary, train_summary), *missing]), ""]
    return "\n".join(lines)
