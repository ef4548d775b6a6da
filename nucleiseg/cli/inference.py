"""``nucleiseg predict``: segment and classify the nuclei of images with a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params

DEFAULT_PARAMS = Path("params.yaml")
SUMMARY_NAME = "summary.json"


@app.command("predict")
def predict(
    model: Annotated[
        str,
        typer.Argument(help="Checkpoint file (.pt) or MLflow model URI, e.g. models:/nucleiseg@champion."),
    ],
    inputs: Annotated[list[Path], typer.Argument(help="Images, or folders of images.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="8-fold flip/rotation test-time augmentation (default: params infer.tta)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", min=0.0, help="Microns per pixel of the images; resampled to the model's (model.mpp)."),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Segment and classify the nuclei of every input image.

    Per image NAME: NAME_label.png (16-bit label, class = id % 3: 0 tumor, 1 lymphocyte, 2 stroma).

    NAME_overlay.png (outlines: red tumor, green lymphocyte, blue stroma), NAME.geojson (QuPath detections).

    NAME_nuclei.csv (one row of measurements per nucleus); summary.json in OUT says what happened to each input.

    Unreadable images are reported and skipped, the others finish; the exit code is 1 when any input failed.

    Settings: params sections infer (tile, overlap, batch_size, tta) and post (min_area, radius).

    Without a params.yaml the defaults (the paper's) apply.

    OUT must be apart from the inputs (not one of them, inside one, or holding one); an existing output that
    nucleiseg did not write is replaced only with --force. All of this is checked before any work.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from nucleiseg.export import output_paths
    from nucleiseg.infer import (
        FileResult,
        InferSettings,
        ModelLoadError,
        PostSettings,
        expand_inputs,
        is_mlflow_uri,
        load_predictor,
        predict_files,
        settings_from,
        summarize,
    )
    from nucleiseg.io import write_json_atomic
    from nucleiseg.outputs import OutputError, OutputFolder

    # The default params.yaml is optional (predict runs outside the project too); an explicit one is not.
    settings = read_params(params if (params != DEFAULT_PARAMS or params.is_file()) else None, set_)
    infer = settings_from(InferSettings, settings.infer.model_dump())
    if tta is not None:
        infer = InferSettings(**{**infer.__dict__, "tta": tta})
    post = settings_from(PostSettings, settings.post.model_dump())

    files, problems = expand_inputs(inputs)
    if not files and not problems:
        fail("no inputs given")
    try:
        folder = OutputFolder(out, inputs=[p for p in inputs if p.exists()], force=force)
        names = [n for f in files for n in (p.name for p in output_paths(out, f.stem).values())]
        folder.claim([*names, SUMMARY_NAME])
    except OutputError as exc:
        fail(str(exc))
    if is_mlflow_uri(model):
        import mlflow

        from nucleiseg.tracking import tracking_uri

        uri = tracking_uri(settings.tracking.uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    try:
        predictor = load_predictor(model, device=device)
    except (ModelLoadError, ValueError) as exc:  # ValueError: an unavailable --device
        fail(str(exc))

    console = Console(stderr=True)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("predicting", total=len(files))

        def advance(result: FileResult) -> None:
            if result.status == "ok":
                folder.record(result.outputs.values())
            progress.update(task, advance=1, description=Path(result.input).name)

        results = problems + predict_files(
            predictor, files, out, infer, post, on_result=advance, mpp=mpp, mpp_tolerance=settings.slide.mpp_tolerance
        )

    summary = summarize(
        results,
        model=model,
        device=predictor.device,
        infer=infer.__dict__,
        post=post.__dict__,
        stain=None if predictor.stain is None else predictor.stain.method,
        mpp=mpp,
        model_mpp=predictor.mpp,
    )
    write_json_atomic(out / SUMMARY_NAME, summary)
    folder.record([out / SUMMARY_NAME])

    table = Table(title=f"nucleiseg predict -> {out}")
    for column in ("input", "status", "nuclei", "tumor", "lymph", "stroma", "s"):
        table.add_column(column, overflow="fold")
    for r in results:
        status = "[green]ok[/green]" if r.status == "ok" else "[red]failed[/red]"
        counts = [str(v) if r.status == "ok" else "" for v in (r.nuclei, r.tumor, r.lymphocyte, r.stroma)]
        table.add_row(Path(r.input).name, status, *counts, f"{r.seconds:.1f}")
    Console().print(table)
    for r in results:
        if r.status == "failed":
            typer.secho(f"failed: {r.error}", fg=typer.colors.RED, err=True)
    n_failed = summary["failed"]
    typer.echo(
        f"{summary['ok']} of {summary['inputs']} inputs done, {n_failed} failed; summary: {out / 'summary.json'}"
    )
    if n_failed:
        raise typer.Exit(1)
