"""`nucleiseg train`: one tracked training run from params."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ParamsOption, SetOption, app, fail, read_params


@app.command("train")
def train_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    prepared: Annotated[
        Path | None, typer.Option(help="Output of `nucleiseg prepare` (default: data.prepared).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Checkpoint folder (default: train.out_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Log the run to MLflow.")] = True,
) -> None:
    """Train the model in params on the prepared dataset; checkpoints in OUT, the run in MLflow."""
    settings = read_params(params, set_)
    from nucleiseg.train import train

    try:
        result = train(settings, prepared or settings.data.prepared, out, resume=resume, track=track, echo=typer.echo)
    except FileNotFoundError as exc:
        fail(str(exc))
        return
    typer.echo(
        f"trained {result.epochs_run} epoch(s) in {result.seconds:.0f} s; best {settings.train.val_metric} "
        f"{result.best_score:.4f} at epoch {result.best_epoch}; checkpoints in {result.out_dir}"
    )
    if result.run_id:
        typer.echo(f"MLflow run {result.run_id}, model {result.model_uri}")
