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
    from nucleiseg.presets import apply_settings, resolve_preset

    try:
        path = resolve_preset(preset)
        changes = apply_settings(path, params)
    except ParamsError as exc:
        fail(f"{exc}; {params} left unchanged")
        return
    for key, (old, new) in changes.items():
        if old != new:
            typer.echo(f"{key}: {old} -> {new}")
    typer.echo(f"applied preset {path} to {params} ({len(changes)} setting(s))")
