"""``nucleiseg slide``: whole slides through a trained model; ``nucleiseg synth-slide``: a synthetic slide to try it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params, use_model_store

DEFAULT_PARAMS = Path("params.yaml")


@app.command("slide")
def slide_command(
    slides: Annotated[list[Path], typer.Argument(help="Slide files (.svs, .ndpi, .mrxs, .tif, OME-TIFF, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Checkpoint, .onnx file, MLflow model folder or URI (default: the champion)."),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", min=0.0, help="Microns per level-0 pixel, for slides without it (0.25 at 40x)."),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option("--mask", help="Tissue mask image (non-zero = tissue) for a single slide.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Segment and classify the nuclei of whole slides, chunk by chunk, in bounded memory.

    The slide is read at the model's resolution (model.mpp; the slide's own from its metadata, or --mpp), only
    chunks on tissue run (detected on a thumbnail, or --mask), and each nucleus is reported once.

    Per slide NAME in OUT: NAME.geojson.gz (QuPath detections, level-0 pixels), NAME_nuclei.parquet (one row
    of measurements per nucleus, um), NAME_classmap.png, NAME_tissue.png, NAME_spatial.html / .json (the spatial
    statistics of the types; params section spatial) and NAME_summary.json.

    Killed, a rerun resumes from the chunks already done. Settings: params sections slide, infer and post.
    OUT must be apart from the slides; outputs nucleiseg did not write are replaced only with --force.
    On a Dask cluster: `nucleiseg batch` with infer.runner: dask. Exit code 1 when any slide failed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from nucleiseg.infer import InferSettings, ModelLoadError, PostSettings, is_mlflow_uri, load_predictor
    from nucleiseg.outputs import OutputError, OutputFolder
    from nucleiseg.spatial import settings_from as spatial_settings
    from nucleiseg.streaming import SlideSettings, segment_slide, slide_name, slide_output_paths
    from nucleiseg.wsi import SlideError

    in_project = params != DEFAULT_PARAMS or params.is_file()
    settings = read_params(params if in_project else None, set_)
    if mask is not None and len(slides) != 1:
        fail("--mask belongs to one slide: give a single slide with it", code=2)
    names = [slide_name(s) for s in slides]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        fail(f"slides with the same name would write the same outputs: {', '.join(clashes)}", code=2)
    model_ref = model or f"models:/{settings.promote.model_name}@champion"
    if is_mlflow_uri(model_ref):  # first: a missing store stops the command before OUT is made
        use_model_store(settings, in_project)
    try:  # before any work: the output folder apart from the slides, nothing replaced that nucleiseg did not write
        folder = OutputFolder(out, inputs=[s for s in slides if s.exists()], force=force)
        folder.claim([p.name for n in names for p in slide_output_paths(out, n).values()])
    except OutputError as exc:
        fail(str(exc))
        return
    from pipelines.batch_inference import resolve_model

    try:
        resolved = resolve_model(model_ref)
        predictor = load_predictor(resolved.load_ref, device=device, backend=settings.infer.backend)
    except (ModelLoadError, ValueError) as exc:  # ValueError: an unavailable --device
        fail(str(exc))
        return
    infer = InferSettings(
        **{k: v for k, v in settings.infer.model_dump().items() if k in InferSettings.__dataclass_fields__}
    )
    post = PostSettings(**settings.post.model_dump())
    slide_settings = SlideSettings.from_mapping(settings.slide.model_dump())
    console = Console(stderr=True)
    failed = 0
    for path in slides:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(f"{path.name}: planning", total=None)

            def planned(plan: object, reused: int, task: int = task, name: str = path.name) -> None:
                progress.update(task, total=len(plan.chunks), description=f"{name}: chunks")  # type: ignore[attr-defined]

            def chunk_done(result: object, task: int = task) -> None:
                progress.advance(task)

            try:
                summary = segment_slide(
                    path, predictor, out, infer=infer, post=post, settings=slide_settings, mpp=mpp,
                    mask_path=mask, model=resolved.as_dict(), spatial=spatial_settings(settings.spatial.model_dump()),
                    on_plan=planned, on_chunk=chunk_done,
                )  # fmt: skip
            except (SlideError, ValueError, OSError) as exc:
                failed += 1
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                typer.secho(f"failed: {message}", fg=typer.colors.RED, err=True)
                continue
        folder.record(summary["outputs"].values())
        counts = ", ".join(f"{n} {c}" for c, n in summary["per_class"].items())
        typer.echo(
            f"{path.name}: {summary['nuclei']} nuclei ({counts}) on {summary['tissue_mm2']:.2f} mm2 of tissue, "
            f"{summary['chunks']['on_tissue']} chunks ({summary['chunks']['reused']} resumed), "
            f"mpp {summary['slide_mpp'][0]:g} ({summary['mpp_source']}) -> {summary['model_mpp']:g}; "
            f"{summary['outputs']['summary']}"
        )
    if failed:
        raise typer.Exit(1)


@app.command("synth-slide")
def synth_slide_command(
    out: Annotated[Path, typer.Argument(help="The slide file to write (.tif).")],
    size: Annotated[int, typer.Option("--size", min=256, help="Level-0 side in pixels.")] = 20000,
    mpp: Annotated[float, typer.Option("--mpp", min=0.0, help="Microns per level-0 pixel (0.25: 40x).")] = 0.25,
    no_mpp: Annotated[bool, typer.Option("--no-mpp", help="Write no resolution (a slide of unknown mpp).")] = False,
    tissue: Annotated[float, typer.Option("--tissue", min=0.01, max=1.0, help="Share of the slide covered.")] = 0.5,
    tiles: Annotated[
        Path | None,
        typer.Option("--from-tiles", help="Folder of H&E tiles (e.g. CoNSeP) to build it from, instead of synthetic."),
    ] = None,
    block: Annotated[
        int, typer.Option("--block", min=16, help="Mosaic block side in px (divisible by 4^(levels-1)).")
    ] = 1024,
    sources: Annotated[int, typer.Option("--sources", min=1, help="Synthetic source tiles in the mosaic.")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    compression: Annotated[str, typer.Option("--compression", help="jpeg or deflate (lossless).")] = "jpeg",
    force: ForceOption = False,
) -> None:
    """Write a pyramidal tiled TIFF (OpenSlide and tifffile read it) with mpp metadata: a mosaic of synthetic
    40x tiles (or of the tiles of --from-tiles) on glass, for trying and benchmarking the slide path."""
    import numpy as np

    from nucleiseg.io import ImageReadError, list_images, read_image
    from nucleiseg.outputs import OutputError, claim_file, record_files
    from nucleiseg.slidegen import synthetic_sources, write_mosaic_slide

    try:
        claim_file(out, inputs=[tiles] if tiles is not None else [], force=force)
    except OutputError as exc:
        fail(str(exc))
        return

    if tiles is not None:
        try:
            images = [read_image(p) for p in list_images(tiles)]
        except ImageReadError as exc:
            fail(str(exc))
            return
        if not images:
            fail(f"--from-tiles {tiles}: no images")
        side = min(min(i.shape[:2]) for i in images)
        if side < block:  # the largest block the tiles hold that still divides into every level
            block = max(16, side // 256 * 256) if side >= 256 else side
        material = images
    else:
        material = synthetic_sources(sources, block, seed)
    try:
        path = write_mosaic_slide(out, size, None if no_mpp else mpp, [np.asarray(m) for m in material],
                                  block=block, tissue_fraction=tissue, seed=seed, compression=compression)  # fmt: skip
    except ValueError as exc:
        fail(str(exc), code=2)
        return
    except OSError as exc:
        fail(f"{out}: cannot write the slide ({exc})")
        return
    record_files(path.parent, [path])
    typer.echo(
        f"wrote {path}: {size}x{size} px at {'unknown' if no_mpp else mpp} um/px, {path.stat().st_size / 1e6:.1f} MB"
    )
