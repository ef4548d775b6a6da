"""``nucleiseg preset``: copy a preset's settings (``presets/<name>.yaml``) into params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ParamsOption, app, fail


@app.command("preset")
def preset_command(
    preset: Annotated[str, typer.Argument(help="A preset name (presets/<name>.yaml: cpu-1h, paper) or a path.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Apply a preset to the params file: only its settings' lines change, comments stay.

    The result is validated before it replaces the file; an invalid one leaves the file as it was. The
    presets are the settings for real annotated tiles in `data/`: cpu-1h (about an hour on 2 CPU cores)
    and paper (the paper's 300-epoch schedule, for a GPU). `git diff params.yaml` shows what changed.
    """
    from nucleiseg.params import ParamsError
    from nucleiseg.presets import resolve_preset

    try:
        path = resolve_preset(preset)
    except ParamsError as exc:
        fail(f"{exc}; {params} left unchanged")
        return
    apply_settings_file(path, params)


def apply_settings_file(path: Path, params: Path) -> None:
    """Copy a settings file into the params file and print what changed; exit 1 (file kept) when invalid."""
    from nucleiseg.params import ParamsError
    from nucleiseg.presets import apply_settings

    try:
        changes = apply_settings(path, params)
    except ParamsError as exc:
        fail(f"{exc}; {params} left unchanged")
        return
    for key, (old, new) in changes.items():
        if old != new:
            typer.echo(f"{key}: {old} -> {new}")
    typer.echo(f"applied {len(changes)} setting(s) from {path} to {params}")
