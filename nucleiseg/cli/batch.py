"""``nucleiseg batch``: the Prefect batch-inference flow (pipelines/batch_inference.py) over a folder of images.

A Prefect flow run when a Prefect API is configured (``PREFECT_API_URL``, e.g. ``make prefect-server``), else the
same steps without Prefect: never a temporary Prefect server per call (pipelines/execution.py says why).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import (
    ForceOption,
    ParamsOption,
    SetOption,
    app,
    fail,
    read_params,
    use_model_store,
)

DEFAULT_PARAMS = Path("params.yaml")


@app.command("batch")
def batch_command(
    input_dir: Annotated[Path, typer.Argument(help="Folder of H&E images (label and ignore maps are left out).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (must differ from INPUT_DIR).")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Checkpoint, MLflow model folder or URI (default: models:/<promote.model_name>@champion).",
        ),
    ] = None,
    model_from: Annotated[
        Path | None,
        typer.Option(
            "--model-from",
            help="The register stage's record (reports/registry.json): its champion version, or the run's own model "
            "when registration was skipped (a DVC experiment).",
        ),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="8-fold flip/rotation test-time augmentation (default: infer.tta)."),
    ] = None,
    runner: Annotated[
        str | None, typer.Option("--runner", help="Prefect task runner: threads, or dask (needs prefect-dask).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Images processed at once (threads or Dask workers).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    split: Annotated[
        str | None, typer.Option("--split", help="Only this split's images (data.prepared/splits.json).")
    ] = None,
    force: ForceOption = False,
    slide_mpp: Annotated[
        float | None,
        typer.Option("--slide-mpp", min=0.0, help="Microns per pixel of slides whose metadata has none."),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bars with the time remaining, on stderr (default: on when stderr is a terminal).",
        ),
    ] = None,
) -> None:
    """Segment every image of INPUT_DIR with the champion model (or --model), as a Prefect flow.

    Per image NAME it writes NAME_label.png, NAME_overlay.png, NAME.geojson and NAME_nuclei.csv (as
    `nucleiseg predict`), the spatial report NAME_spatial.html / .json (settings: spatial), and
    OUT_DIR/batch_summary.json: per image ok / skipped / failed and why, with the
    model version used. Images already done by the same model version with the same settings, whose content
    (SHA-256) has not changed and whose outputs are as written, are skipped. A corrupt image fails alone; the
    exit code is 1 when any failed. MLflow URIs resolve against the params tracking store (or
    MLFLOW_TRACKING_URI; outside a project, MLFLOW_TRACKING_URI is needed). OUT_DIR must be apart from
    INPUT_DIR; outputs nucleiseg did not write need --force.

    With a Prefect API configured (PREFECT_API_URL, e.g. after `make prefect-server`) the batch is a Prefect
    flow run (task runs, logs and a summary artifact in the Prefect UI); without one it runs the same steps
    without Prefect, and no server is started.

    Slides in INPUT_DIR (.svs, .ndpi, .mrxs, tiled TIFF, ...) are processed as `nucleiseg slide` does, their
    chunks mapped over the same runner (threads, or a Dask cluster with --runner dask).
    """
    # The default params.yaml is optional (batch runs outside the project too); an explicit one is not.
    in_project = params != DEFAULT_PARAMS or params.is_file()
    settings = read_params(params if in_project else None, set_)  # type: ignore[arg-type]
    from nucleiseg.infer import ModelLoadError
    from nucleiseg.outputs import OutputError, OutputFolder
    from pipelines.batch_inference import RUNNERS, SUMMARY_NAME, BatchInferenceError, batch, flow_arguments

    if model_from is not None:
        if model is not None:
            fail("--model and --model-from: give one", code=2)
        model = _model_from_record(model_from)
    names = None
    if split is not None:
        from nucleiseg.prepare import read_splits

        splits_path = Path(settings.data.prepared) / "splits.json"
        try:
            names = list(read_splits(splits_path)[split])
        except (OSError, KeyError, ValueError) as exc:
            fail(f"{splits_path}: cannot read split {split!r} ({exc})")
    arguments = flow_arguments(
        settings, input_dir, out_dir, model, tta, runner, workers, device, names, force, slide_mpp
    )
    if arguments["runner"] not in RUNNERS:
        fail(f"--runner {arguments['runner']!r}: expected one of {', '.join(RUNNERS)}", code=2)
    uri = arguments["model_uri"]
    if "://" in uri or uri.startswith(("models:/", "runs:/")):  # first: a missing store stops it before OUT_DIR is made
        use_model_store(settings, in_project)
    try:
        OutputFolder(out_dir, [input_dir], force)  # before the model is loaded; the batch claims the file names
    except OutputError as exc:
        fail(str(exc))
    try:
        summary = batch(**arguments, progress=sys.stderr.isatty() if progress is None else progress)
    except (ModelLoadError, BatchInferenceError) as exc:
        fail(str(exc))
        return
    for result in summary["results"]:
        if result["status"] == "failed":
            typer.secho(f"failed: {result['error']}", fg=typer.colors.RED, err=True)
    typer.echo(
        f"{summary['inputs']} images: {summary['ok']} done, {summary['skipped']} skipped (up to date), "
        f"{summary['failed']} failed; model {summary['model']['identity']}; summary: {out_dir / SUMMARY_NAME}"
    )
    if summary["failed"]:
        raise typer.Exit(1)


def _model_from_record(path: Path) -> str:
    import json

    from nucleiseg.registration import RegistrationRecordError, model_from_record

    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return model_from_record(record, str(path))
    except RegistrationRecordError as exc:
        message = str(exc)
    except (OSError, ValueError) as exc:  # unreadable or not a JSON object
        message = f"{path}: not a registry record ({exc})"
    fail(message)
    return ""  # not reached: fail exits
