"""``nucleiseg evaluate``: score predicted labels against the ground truth and write the figures as JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from nucleiseg.cli.app import app, fail

LABEL_SUFFIX = "_label.png"


def _label_files(folder: Path) -> dict[str, Path]:
    """``<name>_label.png`` files of a folder, by name."""
    if not folder.is_dir():
        fail(f"{folder}: no such folder")
    return {p.name[: -len(LABEL_SUFFIX)]: p for p in sorted(folder.glob(f"*{LABEL_SUFFIX}")) if p.is_file()}


def _json_ready(obj: Any) -> Any:
    """NaN (an undefined figure) becomes ``null``: JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: _json_ready(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(value) for value in obj]
    return obj


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


@app.command("evaluate")
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of predicted labels, <name>_label.png.")],
    gt_dir: Annotated[Path, typer.Argument(help="Folder of ground-truth labels, <name>_label.png (+ ignore maps).")],
    out: Annotated[Path, typer.Option("--out", help="The JSON report to write.")],
    ignore_suffix: Annotated[
        str,
        typer.Option(
            "--ignore-suffix",
            help="Ignore maps are <name><suffix>.png in GT_DIR, optional per image; '' for none.",
        ),
    ] = "_other",
) -> None:
    """Score predictions against ground truth: detection F1, object Dice and Hausdorff, AJI, PQ, mPQ+ and
    classification accuracy, per image and over the set (definitions: nucleiseg.metrics)."""
    from nucleiseg import metrics
    from nucleiseg.io import write_json_atomic
    from nucleiseg.labels import read_label

    preds, gts = _label_files(pred_dir), _label_files(gt_dir)
    unpaired = [f"{preds[n]} (no {n}{LABEL_SUFFIX} in {gt_dir})" for n in sorted(preds.keys() - gts.keys())]
    unpaired += [f"{gts[n]} (no {n}{LABEL_SUFFIX} in {pred_dir})" for n in sorted(gts.keys() - preds.keys())]
    if unpaired:
        fail("unpaired label files: " + "; ".join(unpaired))
    if not gts:
        fail(f"no *{LABEL_SUFFIX} files in {pred_dir} or {gt_dir}")

    per_image: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in sorted(gts):
        try:
            pred, gt = read_label(preds[name]), read_label(gts[name])
            if pred.shape != gt.shape:
                raise ValueError(f"{preds[name]}: shape {pred.shape} differs from {gts[name]}, {gt.shape}")
            ignore = None
            ignore_path = gt_dir / f"{name}{ignore_suffix}.png"
            if ignore_suffix and ignore_path.is_file():
                ignore = read_label(ignore_path)
                if ignore.shape != gt.shape:
                    raise ValueError(f"{ignore_path}: shape {ignore.shape} differs from {gts[name]}, {gt.shape}")
            per_image[name] = metrics.evaluate_image(pred, gt, ignore)
        except ValueError as exc:  # LabelError included; one bad image must not stop the others
            failed[name] = str(exc)
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)

    summary = metrics.summarize(per_image)
    report: dict[str, Any] = {"images": per_image, "summary": summary}
    if failed:
        report["failed"] = failed
    write_json_atomic(out, _json_ready(report))

    a = summary["all"]
    typer.echo(
        f"{summary['n_images']} images: F1 {_fmt(a['f1'])}, Dice {_fmt(a['dice'])}, "
        f"Hausdorff {_fmt(a['hausdorff'])}, AJI {_fmt(a['aji'])}, PQ {_fmt(a['pq'])}, "
        f"accuracy {_fmt(summary['classification']['accuracy'])}, mPQ+ {_fmt(summary['mpq_plus'])} -> {out}"
    )
    if failed:
        fail(f"{len(failed)} of {len(gts)} images not evaluated: {', '.join(sorted(failed))} (see above)")
