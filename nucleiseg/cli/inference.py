"""``nucleiseg predict``: segment and classify the nuclei of images with a trained model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params, use_model_store

DEFAULT_PARAMS = Path("params.yaml")
SUMMARY_NAME = "summary.json"


@app.command("predict")
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="Checkpoint file (.pt), ONNX file (.onnx, from nucleiseg export onnx) or MLflow model URI, e.g. "
            "models:/nucleiseg@champion."
        ),
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
    qupath_objects: Annotated[
        str,
        typer.Option(
            "--qupath-objects",
            help="QuPath object type of the GeoJSON's nuclei: detection, or annotation (editable in QuPath, to "
            "correct and bring back with `nucleiseg import qupath`).",
        ),
    ] = "detection",
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    force: ForceOption = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Keep the outputs an earlier (e.g. killed) run left in OUT for unchanged inputs."
        ),
    ] = False,
) -> None:
    """Segment and classify the nuclei of every input image.

    Per image NAME: NAME_label.png (16-bit label, class = id % 3: 0 tumor, 1 lymphocyte, 2 stroma).

    NAME_overlay.png (outlines: orange tumor, sky-blue lymphocyte, bluish-green stroma),
    NAME.geojson (QuPath detections; editable annotations with --qupath-objects annotation).

    NAME_nuclei.csv (one row of measurements per nucleus); summary.json in OUT says what happened to each input.

    Unreadable images are reported and skipped, the others finish; the exit code is 1 when any input failed.

    Settings: params sections infer (tile, overlap, batch_size, tta, backend) and post (min_area, radius).

    Without a params.yaml the defaults (the paper's) apply.

    OUT must be apart from the inputs (not one of them, inside one, or holding one); an existing output that
    nucleiseg did not write is replaced only with --force. All of this is checked before any work.

    summary.json is rewritten after every image (inputs not yet done are listed as pending), so a killed run
    says how far it got; --resume then keeps the outputs of every input done with the same model and settings
    whose content has not changed since, and predicts the rest.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from nucleiseg.export import OBJECT_TYPES, output_files
    from nucleiseg.infer import (
        FileResult,
        InferSettings,
        ModelLoadError,
        PostSettings,
        expand_inputs,
        is_mlflow_uri,
        load_predictor,
        model_identity,
        predict_files,
        settings_from,
        summarize,
    )
    from nucleiseg.io import write_json_atomic
    from nucleiseg.outputs import OutputError, OutputFolder, file_sha256

    if qupath_objects not in OBJECT_TYPES:
        fail(f"--qupath-objects {qupath_objects!r}: expected one of {', '.join(OBJECT_TYPES)}", code=2)
    # The default params.yaml is optional (predict runs outside the project too); an explicit one is not.
    in_project = params != DEFAULT_PARAMS or params.is_file()
    settings = read_params(params if in_project else None, set_)
    infer = settings_from(InferSettings, settings.infer.model_dump())
    if tta is not None:
        infer = InferSettings(**{**infer.__dict__, "tta": tta})
    post = settings_from(PostSettings, settings.post.model_dump())

    if is_mlflow_uri(model):  # first: a missing store stops the command before OUT is made
        use_model_store(settings, in_project)
    files, problems = expand_inputs(inputs)
    if not files and not problems:
        fail("no inputs given")
    try:
        folder = OutputFolder(out, inputs=[p for p in inputs if p.exists()], force=force)
        names = [p.name for f in files for p in output_files(out, f.stem)]
        folder.claim([*names, SUMMARY_NAME])
    except OutputError as exc:
        fail(str(exc))
    try:
        predictor = load_predictor(model, device=device, backend=settings.infer.backend)
    except (ModelLoadError, ValueError) as exc:  # ValueError: an unavailable --device
        fail(str(exc))

    identity = model_identity(predictor)
    run_settings = {"infer": infer.__dict__, "post": post.__dict__, "mpp": mpp}
    hashes = {f: _sha256_or_none(f, file_sha256) for f in files}
    done: list[FileResult] = list(problems)
    if resume:
        done += _resumable(out / SUMMARY_NAME, identity, run_settings, hashes)
    reused = {Path(r.input) for r in done if r.status == "ok"}
    todo = [f for f in files if f not in reused]

    def write_summary(remaining: list[Path]) -> dict[str, Any]:
        summary = summarize(
            done,
            model=model,
            model_identity=identity,
            device=predictor.device,
            infer=infer.__dict__,
            post=post.__dict__,
            stain=None if predictor.stain is None else predictor.stain.method,
            mpp=mpp,
            model_mpp=predictor.mpp,
        )
        for entry in summary["results"]:
            entry["input_sha256"] = hashes.get(Path(entry["input"]))
        summary["pending"] = [str(p) for p in remaining]
        write_json_atomic(out / SUMMARY_NAME, summary)
        folder.record([out / SUMMARY_NAME])
        return summary

    console = Console(stderr=True)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("predicting", total=len(files), completed=len(files) - len(todo))
        new: list[FileResult] = []

        def advance(result: FileResult) -> None:
            if result.status == "ok":
                folder.record(result.outputs.values())
            new.append(result)
            done.append(result)
            write_summary(todo[len(new) :])
            progress.update(task, advance=1, description=Path(result.input).name)

        write_summary(todo)
        try:
            predict_files(
                predictor, todo, out, infer, post, on_result=advance, mpp=mpp,
                mpp_tolerance=settings.slide.mpp_tolerance, geojson_objects=qupath_objects,
            )  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            typer.secho(f"interrupted: {len(todo) - len(new)} input(s) pending; --resume goes on", err=True)
            raise
    results = done
    summary = write_summary([])

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


def _sha256_or_none(path: Path, digest: Callable[[Path], str]) -> str | None:
    try:
        return digest(path)
    except OSError:  # unreadable: its prediction fails and says why
        return None


def _resumable(
    summary_path: Path, identity: str, settings: dict[str, Any], hashes: dict[Path, str | None]
) -> list[Any]:
    """The results of an earlier run's summary that --resume keeps: inputs done (``ok``) by the same model
    (:func:`nucleiseg.infer.model_identity`) with the same settings, whose content is unchanged and whose
    outputs are still as written (owned, :mod:`nucleiseg.outputs`)."""
    import json

    from nucleiseg.infer import FileResult
    from nucleiseg.outputs import is_owned

    try:
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    same = {"infer": previous.get("infer"), "post": previous.get("post"), "mpp": previous.get("mpp")}
    if previous.get("model_identity") != identity or same != json.loads(json.dumps(settings)):
        return []
    by_input = {Path(p): sha for p, sha in hashes.items() if sha is not None}
    kept = []
    for entry in previous.get("results", []):
        path = Path(entry.get("input", ""))
        if entry.get("status") != "ok" or by_input.get(path) != entry.get("input_sha256"):
            continue
        if entry.get("outputs") and all(is_owned(p) for p in entry["outputs"].values()):
            kept.append(FileResult(**{k: v for k, v in entry.items() if k in FileResult.__dataclass_fields__}))
    return kept
