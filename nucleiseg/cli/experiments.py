"""Experiment commands: ``tune`` (Optuna search over beta, w0, sigma) and ``ablate`` (the paper's Tables 1 and 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ParamsOption, SetOption, app, fail, prefect_env, read_params


@app.command("tune")
def tune_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", min=1, help="Trials to add (default: tune.n_trials).")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage: RDB URL or journal file *.log (default: tune.storage).")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: tune.study).")] = None,
    prepared: Annotated[Path | None, typer.Option(help="Prepared dataset (default: data.prepared).")] = None,
    best: Annotated[
        Path | None, typer.Option(help="Best-settings file to write, or to read with --apply (default: tune.out).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log the study and its trials to MLflow.")] = True,
    apply: Annotated[
        bool, typer.Option("--apply", help="Copy the best settings from BEST into the --params file, then exit.")
    ] = False,
) -> None:
    """Tune beta (perceptual weight), w0 and sigma (weight map) with Optuna: TPE, median pruning, validation F1.

    Several `nucleiseg tune` processes sharing one storage and study add trials to the same study. Each trial
    is a nested MLflow run under the study's parent run. The best settings go to BEST; `nucleiseg tune --apply`
    writes them into params.yaml (only those lines change).
    """
    if apply:
        _apply(params, set_, best, bool(n_trials or storage or study or prepared or timeout))
        return
    settings = read_params(params, set_)
    try:
        if storage is not None:
            settings.tune.storage = storage
        if study is not None:
            settings.tune.study = study
    except ValueError as exc:
        fail(f"invalid option: {exc}", code=2)
    prefect_env()
    from nucleiseg.tuning import TuningError
    from pipelines.tune import tune_from_params

    try:
        summary = tune_from_params(settings, prepared, best, n_trials=n_trials, timeout=timeout, track=track)
    except (TuningError, FileNotFoundError) as exc:
        fail(str(exc))
        return
    typer.echo(
        f"study {summary['study']}: {summary['n_trials']} trials ({summary['n_complete']} complete, "
        f"{summary['n_pruned']} pruned, {summary['n_failed']} failed), {len(summary['trials_here'])} run here"
    )
    if summary["best_params"] is None:
        fail("no trial has completed yet, so there are no best settings")
    values = ", ".join(f"{k}={v:.4g}" for k, v in summary["best_params"].items())
    typer.echo(f"best {summary['objective']} {summary['best_value']:.4f} (trial {summary['best_trial']}): {values}")
    typer.echo(f"written to {summary['best_params_path']}; apply with `nucleiseg tune --apply --params {params}`")
    if summary["parent_run_id"]:
        typer.echo(f"MLflow parent run {summary['parent_run_id']}")


def _apply(params: Path, set_: list[str] | None, best: Path | None, other_options: bool) -> None:
    if set_ or other_options:
        fail("--apply takes only --params and --best", code=2)
    from nucleiseg.cli.presets import apply_settings_file

    if best is None:
        best = Path(read_params(params, None).tune.out)
    if not best.is_file():
        fail(f"{best}: not found; run `nucleiseg tune` first")
    apply_settings_file(best, params)


@app.command("ablate")
def ablate_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Training epochs of every row (default: train.epochs).")
    ] = None,
    rows: Annotated[
        list[str] | None,
        typer.Option("--row", help="Run only this row (repeatable): fcn8s, unet, no_perceptual, no_pretrained, full."),
    ] = None,
    prepared: Annotated[Path | None, typer.Option(help="Prepared dataset (default: data.prepared).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Annotated dataset scored on its test split (default: data.dir).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Checkpoints, one folder per row.")] = Path("models/ablation"),
    report: Annotated[Path, typer.Option(help="The Markdown report (a .json with the figures goes beside it).")] = Path(
        "reports/ablation.md"
    ),
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log every row to MLflow.")] = True,
) -> None:
    """Run the paper's ablation: FCN-8s, U-Net, ResUNet34 without perceptual loss, without pretrained encoder,
    and the full method, with the same data, seed and budget; score each on the test split.

    Writes REPORT with Tables 1 (F1, Dice, Hausdorff, all nuclei and per class) and 2 (classification accuracy)
    beside the paper's published figures. Every row is an MLflow run tagged `ablation`.
    """
    settings = read_params(params, set_)
    prefect_env()
    from nucleiseg.ablation import ROW_KEYS, AblationError
    from pipelines.ablation import ablation_from_params

    unknown = sorted(set(rows or []) - set(ROW_KEYS))
    if unknown:
        fail(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROW_KEYS)}", code=2)
    try:
        result = ablation_from_params(settings, prepared, data_dir, out, report, epochs=epochs, rows=rows, track=track)
    except (AblationError, FileNotFoundError, KeyError) as exc:
        fail(str(exc))
        return
    for row in result["rows"]:
        if row.get("error"):
            typer.secho(f"{row['key']}: failed: {row['error']}", fg=typer.colors.RED, err=True)
            continue
        s = row["test"]
        typer.echo(
            f"{row['key']}: F1 {_fmt(s['all']['f1'])}, Dice {_fmt(s['all']['dice'])}, "
            f"Hausdorff {_fmt(s['all']['hausdorff'])}, accuracy {_fmt(s['classification']['accuracy'])} "
            f"({row['seconds']:.0f} s)"
        )
    typer.echo(f"report: {result['report']}")
    failed = [row["key"] for row in result["rows"] if row.get("error")]
    if failed:
        fail(f"{len(failed)} row(s) failed: {', '.join(failed)} (the others are in the report)")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
