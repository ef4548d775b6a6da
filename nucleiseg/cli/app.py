"""The Typer application and the options every command that reads params shares.

Command modules (``nucleiseg/cli/<area>.py``) register their commands on :data:`app`. They import
heavy libraries (torch, Great Expectations, MLflow, Prefect) inside the command functions, so that
``nucleiseg --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.params import Params, ParamsError, load_params

app = typer.Typer(
    name="nucleiseg",
    help="Joint nuclei segmentation and classification in H&E (Qu et al., ISBI 2019), run as MLOps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="Settings file (params.yaml).")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting, section.key=value (repeatable)."),
]
ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Replace existing outputs that nucleiseg did not write (never an input)."),
]


def read_params(params: Path, overrides: list[str] | None) -> Params:
    """Load and validate settings for a command; exit 2 with the offending key on error."""
    try:
        return load_params(params, overrides or [])
    except ParamsError as exc:
        fail(str(exc), code=2)
        raise AssertionError from exc  # unreachable: fail() exits


def use_model_store(settings: Params, in_project: bool) -> None:
    """Point MLflow (tracking and registry) at the store holding the ``models:/`` or ``runs:/`` model a command
    loads: ``MLFLOW_TRACKING_URI``, else the project's ``tracking.uri``; none is assumed outside a project
    (``in_project``: a params file was read). Exit 1 naming what to set when there is no such store, rather than
    let MLflow create an empty one in the working directory (:func:`nucleiseg.tracking.existing_store_uri`)."""
    from nucleiseg.tracking import StoreNotFoundError, existing_store_uri

    try:
        uri = existing_store_uri(settings.tracking.uri if in_project else None)
    except StoreNotFoundError as exc:
        fail(str(exc))
        return
    from nucleiseg.tracking import use_store

    # A separate registry given by the user stays theirs.
    use_store(uri, None if os.environ.get("MLFLOW_REGISTRY_URI") else uri)


def prefect_env() -> None:
    """Defaults for Prefect's ephemeral API, which starts in a subprocess: time for a loaded machine, offline."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a scheduler stopping a job) exit like Ctrl-C: ``finally`` blocks and ``atexit``
    handlers run, so temporary files are removed, summaries say what is pending and Prefect's ephemeral API
    server is stopped instead of left running. Python's default for SIGTERM ends the process without any of it."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def fail(message: str, code: int = 1) -> None:
    """Print an error message to stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
