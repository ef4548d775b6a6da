"""``nucleiseg retrain`` and ``nucleiseg serve-retrain``: retraining when new annotations land (pipelines/retrain)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ParamsOption, app, fail, prefect_env, read_params

RepoOption = Annotated[
    Path,
    typer.Option("--repo-dir", help="The project checkout (DVC repository) to retrain in; --params is relative to it."),
]


@app.command("retrain")
def retrain_command(params: ParamsOption = Path("params.yaml"), repo_dir: RepoOption = Path(".")) -> None:
    """Run the retraining flow once: when the annotated dataset (data.dir) differs from the champion's, validate
    it, version it (dvc add, dvc push), run `dvc repro` and report the promotion gate's decision.

    Exit 0 when nothing is new or the pipeline ran (promoted or not); exit 1 when validation fails (the failed
    expectations and files are listed) or the pipeline fails (the champion and data.dvc are left as they were).
    """
    read_params(repo_dir / params, None)  # a bad params file is reported here, by key, before Prefect starts
    prefect_env()
    from pipelines.retrain import RetrainError, retrain_on_new_annotations

    try:
        summary = retrain_on_new_annotations(repo_dir=str(repo_dir), params_path=str(params))
    except (RetrainError, FileNotFoundError) as exc:
        fail(str(exc))
        return
    if summary["action"] == "invalid":
        for failure in summary["failures"]:
            typer.echo(f"  {failure['description']}: {', '.join(failure['files']) or '(dataset-level)'}", err=True)
        fail(summary["message"])
    if summary["action"] == "refused":
        typer.echo(summary["inbox"]["reason"], err=True)
        fail(summary["message"])
    colour = typer.colors.GREEN if summary.get("promoted") else None
    typer.secho(summary["message"], fg=colour)


@app.command("serve-retrain")
def serve_retrain_command(
    params: ParamsOption = Path("params.yaml"),
    repo_dir: RepoOption = Path("."),
    port: Annotated[int, typer.Option("--port", help="Port of the local Prefect server (UI and API).")] = 4200,
    server_log: Annotated[
        Path | None, typer.Option("--server-log", help="Write the local Prefect server's log to this file.")
    ] = None,
) -> None:
    """Retrain when corrected annotations land in the inbox (params data.inbox), and on the cron schedule of
    params `schedule` as the fallback, until Ctrl-C.

    Starts a local Prefect server on --port (unless PREFECT_API_URL names one), serves the retraining deployment
    (an event trigger on the inbox and the cron schedule; one run at a time, a run that would overlap waits), and
    watches the inbox: a burst of files (no new file for schedule.inbox_quiet_s seconds) becomes one event, and
    one run. Ctrl-C stops the watcher, the runner and the server.
    """
    settings = read_params(repo_dir / params, None)
    prefect_env()
    from pipelines.retrain import build_deployment, serve

    try:
        build_deployment(settings, repo_dir, str(params))  # a bad cron string or timezone fails here, clearly
    except ValueError as exc:
        fail(f"{repo_dir / params}: schedule: {exc}", code=2)
    inbox = settings.data.inbox

    def ready(api_url: str) -> None:
        typer.echo(
            f"watching {inbox}/ and serving retraining (Prefect API {api_url}; cron {settings.schedule.cron!r} "
            f"{settings.schedule.timezone} as the fallback); Ctrl-C stops",
            err=True,
        )

    serve(settings, repo_dir, str(params), port=port, server_log=server_log, on_ready=ready)
