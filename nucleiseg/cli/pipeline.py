"""``nucleiseg register`` and ``nucleiseg promote``: the model registry and its promotion gate (nucleiseg.registry).

``register`` is the last stage of the DVC pipeline: it adds the model that ``nucleiseg train`` logged as a new
version of the registered model, tagged with the test figures ``nucleiseg evaluate`` measured on the current split,
and runs the gate. Those figures are the challenger's current-split score; a champion scored on another split
needs an evaluator to be compared (:func:`register_from_files` takes one; the command passes none yet, so such a
champion stays and the reason says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nucleiseg.cli.app import ParamsOption, SetOption, app, fail, read_params

if TYPE_CHECKING:
    from nucleiseg.params import Params
    from nucleiseg.registry import Decision, Evaluator

DEFAULT_REPORT = Path("reports/registry.json")


def _read_summary(path: Path) -> dict[str, Any]:
    """The ``summary`` of a ``nucleiseg evaluate`` report; exits naming the file when it is unusable."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        fail(f"{path}: metrics file not found; run `nucleiseg evaluate` first")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: not a readable JSON metrics report ({exc})")
    summary = report.get("summary") if isinstance(report, dict) else None
    if not isinstance(summary, dict):
        fail(f"{path}: no 'summary' section; expected the report of `nucleiseg evaluate`")
    return summary


def _split_names(splits: Path) -> tuple[list[str], list[str]]:
    """``(train + val, test)`` image names of a ``splits.json``; exits naming the file when it is unusable."""
    from nucleiseg.prepare import read_splits

    try:
        names = read_splits(splits)
    except ValueError as exc:
        fail(str(exc))
    return names["train"] + names["val"], names["test"]


def _echo_decision(decision: Decision, name: str) -> None:
    colour = typer.colors.GREEN if decision.promoted else typer.colors.YELLOW
    typer.secho(f"{name} v{decision.challenger}: {decision.decision}. {decision.reason}", fg=colour)


def register_from_files(
    settings: Params,
    model_dir: Path,
    metrics: Path,
    data_dir: Path,
    splits: Path,
    out: Path | None = DEFAULT_REPORT,
    evaluate: Evaluator | None = None,
) -> dict[str, Any]:
    """Register the model of ``model_dir`` with the figures of ``metrics`` and run the gate; write ``out``.

    ``evaluate(model_uri) -> summary`` scores a registered version on the current test split; it is used
    only for versions whose recorded split differs from ``splits``. Returns what ``out`` holds.
    """
    from nucleiseg import registry, tracking
    from nucleiseg.io import write_json_atomic

    uri_file = model_dir / "model_uri"
    if not uri_file.is_file():
        fail(f"{uri_file}: not found; run `nucleiseg train` with tracking on first")
    model_uri = uri_file.read_text().strip()
    if not model_uri:
        fail(f"{uri_file}: empty; expected the MLflow URI of the logged model")
    run_file = model_dir / "mlflow_run_id"
    run_id = (run_file.read_text().strip() or None) if run_file.is_file() else None
    summary = _read_summary(metrics)
    promote = settings.promote
    try:
        registry.lookup_metric(summary, promote.metric)
    except KeyError:
        fail(f"{metrics}: the summary has no {promote.metric!r} (promote.metric)")
    if not data_dir.is_dir():
        fail(f"{data_dir}: dataset folder not found")
    try:
        split = registry.split_hash(splits)
    except registry.RegistryError as exc:
        fail(str(exc))
    trained_on, test_images = _split_names(splits)

    tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    try:
        version = registry.register_model(
            model_uri,
            promote.model_name,
            summary,
            dataset_hash=tracking.dataset_hash(data_dir),
            split_hash=split,
            git_commit=tracking.git_commit(),
            params_hash=settings.digest(),
            run_id=run_id,
            trained_on=trained_on,
        )
        typer.echo(f"registered {model_uri} as {promote.model_name} v{version} (alias {registry.CHALLENGER})")
        decision = registry.promote_challenger(
            promote.model_name,
            promote.metric,
            promote.tie_breaker,
            split_hash=split,
            evaluate=evaluate,
            test_images=test_images,
        )
        state = registry.registry_state(promote.model_name)
    except registry.RegistryError as exc:
        fail(str(exc))
    _echo_decision(decision, promote.model_name)
    result = {
        "model_name": promote.model_name,
        "version": version,
        "model_uri": f"models:/{promote.model_name}/{version}",
        "source": model_uri,
        "split_hash": split,
        "aliases": state["aliases"],
        "decision": decision.to_dict(),
    }
    if out is not None:
        write_json_atomic(out, result)
    return result


def split_evaluator(settings: Params, splits: Path) -> Evaluator:
    """Score a registered version on the current test split, as the evaluate stage does (for the gate)."""

    def evaluate(model_uri: str) -> dict[str, Any]:
        from nucleiseg.evaluation import evaluate_model, split_items
        from nucleiseg.infer import load_predictor

        items = split_items(settings.data.dir, splits, "test", settings.eval.ignore_suffix)
        typer.echo(f"scoring {model_uri} on the current test split ({len(items)} images)")
        return evaluate_model(load_predictor(model_uri, device=settings.train.device), items)["summary"]

    return evaluate


@app.command("register")
def register_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Output of `nucleiseg train` (default: train.out_dir).")
    ] = None,
    metrics: Annotated[
        Path | None, typer.Option("--metrics", help="Test report of `nucleiseg evaluate` (default: eval.out).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="The annotated dataset, hashed (default: data.dir).")
    ] = None,
    splits: Annotated[
        Path | None, typer.Option("--splits", help="The split definition, hashed (default: data.prepared/splits.json).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the registry summary JSON.")] = DEFAULT_REPORT,
) -> None:
    """Register the trained model as a new version (alias challenger) tagged with its test figures and
    provenance, then run the promotion gate: it becomes champion only if it beats the champion."""
    settings = read_params(params, set_)
    splits = splits or Path(settings.data.prepared) / "splits.json"
    register_from_files(
        settings,
        model_dir or Path(settings.train.out_dir),
        metrics or Path(settings.eval.out),
        data_dir or Path(settings.data.dir),
        splits,
        out,
        evaluate=split_evaluator(settings, splits),
    )
    typer.echo(f"-> {out}")


@app.command("promote")
def promote_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    version: Annotated[
        int | None, typer.Option("--version", help="Make this version champion (manual, bypasses the gate).")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why, for a manual promotion (recorded).")] = "manual",
    splits: Annotated[
        Path | None,
        typer.Option("--splits", help="The current split definition (default: data.prepared/splits.json)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the decision as JSON here.")] = None,
) -> None:
    """Promote a model version to champion: with --version, deliberately (recorded as manual); without,
    run the promotion gate on the current challenger."""
    settings = read_params(params, set_)
    from nucleiseg import registry, tracking
    from nucleiseg.io import write_json_atomic

    name = settings.promote.model_name
    splits = splits or Path(settings.data.prepared) / "splits.json"
    split, test_images = None, None
    if version is None:
        if splits.is_file():
            split = registry.split_hash(splits)
            test_images = _split_names(splits)[1]
        else:
            typer.secho(
                f"warning: {splits} not found; comparing recorded figures without checking their split",
                fg=typer.colors.YELLOW,
                err=True,
            )
    tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    try:
        if version is not None:
            decision = registry.promote_version(name, version, reason)
        else:
            decision = registry.promote_challenger(
                name,
                settings.promote.metric,
                settings.promote.tie_breaker,
                split_hash=split,
                evaluate=split_evaluator(settings, splits) if split is not None else None,
                test_images=test_images,
            )
        state = registry.registry_state(name)
    except registry.RegistryError as exc:
        fail(str(exc))
    _echo_decision(decision, name)
    typer.echo("aliases: " + ", ".join(f"{a}=v{v}" for a, v in state["aliases"].items()))
    if out is not None:
        write_json_atomic(out, {"model_name": name, "aliases": state["aliases"], "decision": decision.to_dict()})
