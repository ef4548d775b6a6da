"""``nucleiseg evaluate``: score predicted labels against the ground truth and write the figures as JSON."""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params

if TYPE_CHECKING:
    from nucleiseg.params import Params

LABEL_SUFFIX = "_label.png|.tif"


class Protocol(StrEnum):
    """The evaluation protocols of nucleiseg.evaluation.PROTOCOLS."""

    paper = "paper"
    hovernet = "hovernet"
    both = "both"


PROTOCOL_HELP = (
    "paper: the paper's figures (ignore-map nuclei ignored); hovernet: HoVer-Net's CoNSeP protocol (ignore-map "
    "nuclei a 4th ground-truth type, 'other'); both. Definitions: nucleiseg.metrics."
)
ProtocolOverride = Annotated[
    Protocol | None, typer.Option("--protocol", help=PROTOCOL_HELP + " Default: eval.protocol.", show_default=False)
]


def _with_protocol(set_: list[str] | None, protocol: Protocol | None) -> list[str]:
    """``--set`` overrides plus ``eval.protocol`` from ``--protocol``, so the settings record what was used."""
    return [*(set_ or []), *([f"eval.protocol={protocol.value}"] if protocol is not None else [])]


def _label_files(folder: Path) -> dict[str, Path]:
    """``<name>_label.png`` (or ``.tif``, ``.tiff``: 32-bit labels) files of a folder, by name."""
    from nucleiseg.labels import LabelError, label_files

    if not folder.is_dir():
        fail(f"{folder}: no such folder")
    try:
        return label_files(folder)
    except LabelError as exc:
        fail(str(exc))
        raise AssertionError from exc  # unreachable: fail() exits


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


def _figures_line(report: dict[str, Any]) -> str:
    """The headline figures of each protocol a report holds, for the terminal."""
    parts = []
    if "summary" in report:
        s = report["summary"]
        a = s["all"]
        parts.append(
            f"F1 {_fmt(a['f1'])}, Dice {_fmt(a['dice'])}, Hausdorff {_fmt(a['hausdorff'])}, AJI {_fmt(a['aji'])}, "
            f"PQ {_fmt(a['pq'])}, accuracy {_fmt(s['classification']['accuracy'])}, mPQ+ {_fmt(s['mpq_plus'])}"
        )
    if "hovernet" in report:
        m, p = report["hovernet"]["mean"], report["hovernet"]["pooled"]
        parts.append(
            f"HoVer-Net protocol: Dice {_fmt(m['dice'])}, AJI {_fmt(m['aji'])}, PQ {_fmt(m['pq'])}, "
            f"F1d {_fmt(p['f1_d'])}, type accuracy {_fmt(p['type_accuracy'])}, F tumor {_fmt(p['f1_tumor'])}, "
            f"F lymphocyte {_fmt(p['f1_lymphocyte'])}, F stroma {_fmt(p['f1_stroma'])}, F other {_fmt(p['f1_other'])}"
        )
    return "; ".join(parts)


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
    protocol: Annotated[Protocol, typer.Option("--protocol", help=PROTOCOL_HELP)] = Protocol.both,
    force: ForceOption = False,
) -> None:
    """Score predictions against ground truth: detection F1, object Dice and Hausdorff, AJI, PQ, mPQ+ and
    classification accuracy, per image and over the set (the paper's protocol: `images`, `summary`), and/or
    HoVer-Net's Dice, AJI, DQ, SQ, PQ per image and F1d, type accuracy, F per type pooled (section `hovernet`).
    OUT must not lie in PRED_DIR or GT_DIR; an existing OUT that nucleiseg did not write needs --force."""
    from nucleiseg.evaluation import assemble_report, score_image
    from nucleiseg.io import write_json_atomic
    from nucleiseg.labels import read_label
    from nucleiseg.outputs import OutputError, claim_file, record_files

    try:
        claim_file(out, [pred_dir, gt_dir], force)
    except OutputError as exc:
        fail(str(exc))
    preds, gts = _label_files(pred_dir), _label_files(gt_dir)
    unpaired = [f"{preds[n]} (no {n}{LABEL_SUFFIX} in {gt_dir})" for n in sorted(preds.keys() - gts.keys())]
    unpaired += [f"{gts[n]} (no {n}{LABEL_SUFFIX} in {pred_dir})" for n in sorted(gts.keys() - preds.keys())]
    if unpaired:
        fail("unpaired label files: " + "; ".join(unpaired))
    if not gts:
        fail(f"no *{LABEL_SUFFIX} files in {pred_dir} or {gt_dir}")

    scores: dict[str, Any] = {}
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
            scores[name] = score_image(pred, gt, ignore, protocol.value)
        except ValueError as exc:  # LabelError included; one bad image must not stop the others
            failed[name] = str(exc)
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)

    report = assemble_report(scores, protocol.value)
    if failed:
        report["failed"] = failed
    write_json_atomic(out, _json_ready(report))
    record_files(out.parent, [out])
    typer.echo(f"{len(scores)} images: {_figures_line(report)} -> {out}")
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
    protocol: ProtocolOverride = None,
    force: ForceOption = False,
    track: Annotated[
        bool,
        typer.Option(
            "--track/--no-track",
            help="Test split of a checkpoint that `nucleiseg train` logged: add the figures (test/...) and the "
            "confusion matrix to its MLflow run and logged model.",
        ),
    ] = True,
) -> None:
    """Predict a split's original images with MODEL and score them (the pipeline's evaluate stage).

    Writes the metrics JSON (as `nucleiseg evaluate`) and, beside it, <stem>_summary.json with the headline
    figures (DVC metrics) and confusion.json with one row per matched nucleus (actual, predicted) for DVC's
    confusion plot. Tiling and post-processing come from the params sections infer and post (as for `nucleiseg
    predict`), not from the settings saved with the model, so `--set infer.tile=1024` scores a model that way.
    The protocol (eval.protocol, or --protocol) decides which figures: the paper's, HoVer-Net's, or both.
    The output folders must be apart from the dataset; outputs nucleiseg did not write need --force.
    The test split of a checkpoint that `nucleiseg train` logged (mlflow_run_id beside it, same bytes) adds its
    figures as metrics test/all/f1, test/hovernet/pq, ... to that run and its logged model (--no-track: not)."""
    settings = read_params(params, _with_protocol(set_, protocol))
    from nucleiseg import tracking
    from nucleiseg.evaluation import confusion_rows, evaluate_model, headline, split_items
    from nucleiseg.export import output_files
    from nucleiseg.infer import InferSettings, ModelLoadError, PostSettings, load_predictor, settings_from
    from nucleiseg.io import write_json_atomic
    from nucleiseg.outputs import OutputFolder, claim_file, record_files

    out = out or Path(settings.eval.out)
    data = Path(data_dir or settings.data.dir)
    try:
        splits = splits or Path(settings.data.prepared) / "splits.json"
        items = split_items(data, splits, split, settings.eval.ignore_suffix)
        written = [out, out.with_name(f"{out.stem}_summary.json"), out.with_name("confusion.json")]
        for path in written:
            claim_file(path, [data, splits], force)
        folders: dict[str, OutputFolder] = {}
        if predictions is not None:
            folders["predictions"] = OutputFolder(predictions, [data, splits], force)
            folders["predictions"].claim(p.name for i in items for p in output_files(predictions, i.name))
        if overlays is not None:
            folders["overlays"] = OutputFolder(overlays, [data, splits], force)
            folders["overlays"].claim(f"{i.name}.png" for i in items)
    except (OSError, KeyError, ValueError) as exc:  # OutputError is a ValueError
        fail(str(exc))
        return
    if "://" in model or model.startswith(("models:/", "runs:/")):
        tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    try:
        predictor = load_predictor(model, device=settings.train.device, backend=settings.infer.backend)
    except ModelLoadError as exc:
        fail(str(exc))
        return
    predictor.infer = settings_from(InferSettings, settings.infer.model_dump())
    predictor.post = settings_from(PostSettings, settings.post.model_dump())
    report = evaluate_model(
        predictor,
        items,
        out_dir=predictions,
        overlay_dir=overlays,
        on_image=lambda name: _scored(name, folders, predictions, overlays),
        protocol=settings.eval.protocol,
    )
    report["model"] = model
    report["split"] = split
    report["infer"], report["post"] = predictor.infer.__dict__, predictor.post.__dict__
    write_json_atomic(out, _json_ready(report))
    write_json_atomic(out.with_name(f"{out.stem}_summary.json"), _json_ready(headline(report)))
    write_json_atomic(out.with_name("confusion.json"), confusion_rows(report))
    record_files(out.parent, written)
    typer.echo(f"{split}: {len(items)} image(s); {_figures_line(report)}; written to {out}")
    if track and split == "test" and Path(model).is_file():
        typer.echo(_record_test_results(Path(model), report, settings, data, splits, written[1]))


def _record_test_results(checkpoint: Path, report: dict[str, Any], settings: Params, data: Path, splits: Path,
                         summary_file: Path) -> str:  # fmt: skip
    """Add a checkpoint's test figures to the MLflow run that trained it, when there is one (nucleiseg.lineage)."""
    from nucleiseg import lineage, tracking
    from nucleiseg.evaluation import confusion_matrix, headline
    from nucleiseg.prepare import read_splits

    if not checkpoint.with_name(lineage.RUN_ID_FILE).is_file():
        return f"test figures not logged to MLflow: no {lineage.RUN_ID_FILE} beside {checkpoint}"
    tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    test_set = lineage.split_datasets(data, read_splits(splits)).get("test")
    return lineage.record_test_results(
        checkpoint, _json_ready(headline(report)), confusion_matrix(report), [summary_file], test_set
    )


def _scored(name: str, folders: dict[str, Any], predictions: Path | None, overlays: Path | None) -> None:
    """Mark one scored image's outputs as written by nucleiseg (nucleiseg.outputs) and say so."""
    from nucleiseg.export import output_files

    if predictions is not None:
        folders["predictions"].record(p for p in output_files(predictions, name) if p.is_file())
    if overlays is not None:
        folders["overlays"].record([overlays / f"{name}.png"])
    typer.echo(f"scored {name}")


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
    protocol: ProtocolOverride = None,
    track: Annotated[
        bool,
        typer.Option("--track/--no-track", help="Add the report to the MLflow run of the scored checkpoint."),
    ] = True,
) -> None:
    """Write the results report: Tables 1 and 2, AJI / PQ / mPQ+, confusion matrix, per image (the paper's
    protocol), HoVer-Net's figures (its protocol), published figures beside them, training, overlays. Which
    protocols: eval.protocol, or --protocol (a protocol the metrics file lacks is named in the report). A report on
    the test split of a checkpoint that `nucleiseg train` logged is added to that MLflow run (evaluation/)."""
    import json

    from nucleiseg.io import write_text_atomic
    from nucleiseg.report import render

    settings = read_params(params, _with_protocol(set_, protocol))
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
            protocol=settings.eval.protocol,
        )
    except (OSError, ValueError, KeyError) as exc:
        fail(f"{metrics}: cannot report it ({exc})")
        return
    write_text_atomic(out, text)
    typer.echo(f"report written to {out}")
    model = evaluation.get("model")
    if track and evaluation.get("split") == "test" and isinstance(model, str) and Path(model).is_file():
        typer.echo(_log_report(Path(model), out, settings))


def _log_report(checkpoint: Path, report: Path, settings: Params) -> str:
    """Add the report to the MLflow run that trained the scored checkpoint, when there is one."""
    from nucleiseg import lineage, tracking

    if not checkpoint.with_name(lineage.RUN_ID_FILE).is_file():
        return f"report not logged to MLflow: no {lineage.RUN_ID_FILE} beside {checkpoint}"
    tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    found = lineage.training_run_of(checkpoint)
    if isinstance(found, str):
        return f"report not logged to MLflow: {found}"
    lineage.log_artifacts(found[0], [report], "evaluation")
    return f"report logged to MLflow run {found[0]} (evaluation/{report.name})"
