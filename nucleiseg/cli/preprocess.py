"""Data commands: ``validate`` checks a dataset folder with Great Expectations, ``prepare`` runs the Prefect
preprocessing flow (validate, split, stain-normalise, patches, statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, prefect_env, read_params

DEFAULT_PARAMS = Path("params.yaml")


@app.command("validate")
def validate_command(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder: <name>.png with <name>_label.png (+ _other).")],
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the GX result, report.json, report.html (offline) and data docs.")
    ] = Path("reports/validation"),
    force: ForceOption = False,
) -> None:
    """Validate a dataset folder against the expectation suite (thresholds: params `checks`).

    Exit 0 when the dataset is valid; exit 1 with the failed expectations and the offending files otherwise.
    Without a params file (the default params.yaml absent), the default thresholds apply.

    OUT is replaced as a whole: it must be apart from DATA_DIR, and a folder that `nucleiseg validate` did not
    make is replaced only with --force.
    """
    settings = read_params(None if params == DEFAULT_PARAMS and not params.is_file() else params, set_)  # type: ignore[arg-type]
    from nucleiseg.outputs import OutputError, check_replaceable
    from nucleiseg.validation import build_manifest, validate_manifest

    try:
        check_replaceable(out, "validate", [data_dir], force)
    except OutputError as exc:
        fail(str(exc))
    try:
        manifest = build_manifest(data_dir, settings.data.ignore_suffix)
    except FileNotFoundError as exc:
        fail(str(exc))
        return
    try:
        report = validate_manifest(manifest, settings.checks, out, dataset=str(data_dir))
    except OSError as exc:
        fail(f"{out}: cannot write the validation artifacts ({exc})")
        return
    if not report.success:
        typer.echo(report.summary(), err=True)
        typer.echo(f"validation result and data docs: {out} (open {out / 'report.html'} offline)", err=True)
        fail(f"{data_dir}: dataset is invalid ({len(report.failures)} expectation(s) failed, see above)")
    typer.echo(report.summary())
    typer.echo(f"validation result and data docs: {out} (open {out / 'report.html'} offline)")


@app.command("prepare")
def prepare_command(
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Dataset folder (default: params data.dir).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder, replaced as a whole (default: data.prepared).")
    ] = None,
    force: ForceOption = False,
) -> None:
    """Run the Prefect preprocessing flow: validate, split, stain-normalise, patches, channel statistics.

    Runs locally on Prefect's ephemeral API. An invalid dataset stops the flow (exit 1, the failed expectations
    and files are listed) and the previous OUT is left untouched, as after any failure. OUT must be apart from
    the dataset, and a folder that `nucleiseg prepare` did not make is replaced only with --force.
    """
    settings = read_params(params, set_)
    out = out or Path(settings.data.prepared)
    from nucleiseg.outputs import OutputError, check_replaceable

    try:
        check_replaceable(out, "prepare", [data_dir or Path(settings.data.dir)], force)
    except OutputError as exc:
        fail(str(exc))
    prefect_env()
    from nucleiseg.stain import StainError
    from nucleiseg.validation import DatasetValidationError
    from pipelines.preprocess import PreprocessError, preprocess_from_params

    try:
        summary = preprocess_from_params(settings, data_dir, out)
    except DatasetValidationError as exc:
        typer.echo(exc.report.summary(), err=True)
        fail(f"{exc.report.dataset}: dataset is invalid; {out} left unchanged")
        return
    except (PreprocessError, StainError, FileNotFoundError, ValueError) as exc:
        fail(f"{exc}\n{out} left unchanged")
        return
    counts = ", ".join(f"{n} {s}" for s, n in summary["images"].items())
    typer.echo(f"{out}: {counts} images, {summary['patches']} training patches")
