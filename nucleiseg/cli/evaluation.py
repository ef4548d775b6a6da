"""``nucleiseg evaluate``: score predicted labels against the ground truth and write the figures as JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from nucleiseg.cli.app import ParamsOption, SetOption, app, fail, read_params

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


@app.command("score")
def score(
    model: Annotated[str, typer.Argument(help="Checkpoint path or MLflow model URI (models:/nucleiseg@champion).")],
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    splits: Annotated[
        Path | None, typer.Option(help="splits.json of `nucleiseg prepare` (default: data.prepared/splits.json).")
    ] = None,
    split: Annotated[str, typer.Option(help="Which split to score.")] = "test",
    data_dir: Annotated[Path | None, typer.Option(help="Annotated dataset (default: data.dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Metrics JSON (default: eval.out).")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Also write the per-image outputs here.")] = None,
    overlays: Annotated[Path | None, typer.Option(help="Also write overlay images (<name>.png) here.")] = None,
) -> None:
    """Predict a split's original images with MODEL and score them (the pipeline's evaluate stage).

    Writes the metrics JSON (as `nucleiseg evaluate`) and, beside it, <stem>_summary.json with the headline
    figures (DVC metrics) and confusion.json with one row per matched nucleus (actual, predicted) for DVC's
    confusion plot. Tiling and post-processing come from the params sections infer and post (as for `nucleiseg
    predict`), not from the settings saved with the model, so `--set infer.tile=1024` scores a model that way."""
    settings = read_params(params, set_)
    from nucleiseg import tracking
    from nucleiseg.evaluation import confusion_rows, evaluate_model, headline, split_items
    from nucleiseg.infer import InferSettings, ModelLoadError, PostSettings, load_predictor, settings_from
    from nucleiseg.io import write_json_atomic

    out = out or Path(settings.eval.out)
    try:
        splits = splits or Path(settings.data.prepared) / "splits.json"
        items = split_items(data_dir or settings.data.dir, splits, split, settings.eval.ignore_suffix)
    except (OSError, KeyError, ValueError) as exc:
        fail(str(exc))
        return
    if "://" in model or model.startswith(("models:/", "runs:/")):
        tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    try:
        predictor = load_predictor(model, device=settings.train.device)
    except ModelLoadError as exc:
        fail(str(exc))
        return
    predictor.infer = settings_from(InferSettings, settings.infer.model_dump())
    predictor.post = settings_from(PostSettings, settings.post.model_dump())
    report = evaluate_model(
        predictor, items, out_dir=predictions, overlay_dir=overlays, on_image=lambda n: typer.echo(f"scored {n}")
    )
    report["model"] = model
    report["split"] = split
    report["infer"], report["post"] = predictor.infer.__dict__, predictor.post.__dict__
    write_json_atomic(out, _json_ready(report))
    write_json_atomic(out.with_name(f"{out.stem}_summary.json"), _json_ready(headline(report)))
    write_json_atomic(out.with_name("confusion.json"), confusion_rows(report))
    s = report["summary"]
    typer.echo(
        f"{split}: {len(items)} image(s); F1 {_fmt(s['all']['f1'])}, Dice {_fmt(s['all']['dice'])}, "
        f"Hausdorff {_fmt(s['all']['hausdorff'])}, AJI {_fmt(s['all']['aji'])}, PQ {_fmt(s['all']['pq'])}, "
        f"accuracy {_fmt(s['classification']['accuracy'])}; written to {out}"
    )


@app.command("report")
def report_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON of `nucleiseg score` (default: eval.out).")] = None,
    train_summary: Annotated[
        Path | None, typer.Option(help="train_summary.json of `nucleiseg train` (default: in train.out_dir).")
    ] = None,
    overlays: Annotated[Path | None, typer.Option(help="Folder of test overlays to show.")] = Path("reports/overlays"),
    out: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path("reports/results.md"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "Results on the test split",
    compare: Annotated[
        list[str] | None, typer.Option("--compare", help="Published figures to compare with: hovernet-consep.")
    ] = None,
) -> None:
    """Write the results report: Tables 1 and 2, AJI / PQ / mPQ+, confusion matrix, per image, training, overlays."""
    import json

    from nucleiseg.io import write_text_atomic
    from nucleiseg.report import render

    settings = read_params(params, set_)
    metrics = metrics or Path(settings.eval.out)
    train_summary = train_summary or Path(settings.train.out_dir) / "train_summary.json"
    try:
        evaluation = json.loads(metrics.read_text())
        summary = json.loads(train_summary.read_text()) if train_summary.is_file() else None
        text = render(
            evaluation,
            settings.flat(),
            out,
            train_summary=summary,
            title=title,
            dataset=settings.data.dir,
            compare=compare or [],
            overlay_dir=overlays,
        )
    except (OSError, ValueError, KeyError) as exc:
        fail(f"{metrics}: cannot report it ({exc})")
        return
    write_text_atomic(out, text)
    typer.echo(f"report written to {out}")
