"""The ``nucleiseg`` command line: a thin layer over the library, one module per area."""

from nucleiseg.cli import (  # noqa: F401  (importing registers the commands)
    batch,
    evaluation,
    experiments,
    export,
    inference,
    labels,
    pipeline,
    preprocess,
    presets,
    schedule,
    slide,
    spatial,
    synth,
    training,
    weightmap,
)
from nucleiseg.cli.app import app, exit_on_sigterm


def main() -> None:
    exit_on_sigterm()
    app()


__all__ = ["app", "main"]
