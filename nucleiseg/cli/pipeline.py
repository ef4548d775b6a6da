"""``nucleiseg register`` and ``nucleiseg promote``: the model registry and its promotion gate (nucleiseg.registry).

``register`` is the last stage of the DVC pipeline: it scores the model that ``nucleiseg train`` logged on the
current test split itself (no metrics file is trusted: a report can be stale, belong to another model, list failed
images, or be edited), which also proves that the model loads and runs; then, under the registry's lock, it adds
the model as a new version tagged with those figures and runs the gate on that version. A champion scored on
another split is scored again the same way; a version must pass a smoke test (load, predict a tile) before it
takes ``champion``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params
from nucleiseg.registration import RegistrationDecision, registration_decision

if TYPE_CHECKING:
    from nucleiseg.params import Params
    from nucleiseg.registry import Checker, Decision, Evaluator

DEFAULT_REPORT = Path("reports/registry.json")


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


def _claim_report(out: Path | None, inputs: list[Path], force: bool) -> None:
    from nucleiseg.outputs import OutputError, claim_file

    if out is not None:
        try:
            claim_file(out, inputs, force)
        except OutputError as exc:
            fail(str(exc))


def _write_report(out: Path | None, result: dict[str, Any]) -> None:
    from nucleiseg.io import write_json_atomic
    from nucleiseg.outputs import record_files

    if out is not None:
        write_json_atomic(out, result)
        record_files(out.parent, [out])


def register_from_files(
    settings: Params,
    model_dir: Path,
    data_dir: Path,
    splits: Path,
    out: Path | None = DEFAULT_REPORT,
    evaluate: Evaluator | None = None,
    check: Checker | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score the model of ``model_dir`` on the test split of ``splits`` with ``evaluate`` (default:
    :func:`split_evaluator`), register it with those figures and run the gate on it; write ``out``.

    ``evaluate(model_uri) -> summary`` also scores registered versions whose recorded split differs from
    ``splits``; ``check(model_uri)`` smoke-tests a version before it becomes champion (default:
    :func:`smoke_checker`). A model that cannot be loaded or scored is not registered. Returns what ``out`` holds.
    """
    from nucleiseg import registry, tracking

    _claim_report(out, [data_dir, splits], force)
    uri_file = model_dir / "model_uri"
    if not uri_file.is_file():
        fail(f"{uri_file}: not found; run `nucleiseg train` with tracking on first")
    model_uri = uri_file.read_text().strip()
    if not model_uri:
        fail(f"{uri_file}: empty; expected the MLflow URI of the logged model")
    run_file = model_dir / "mlflow_run_id"
    run_id = (run_file.read_text().strip() or None) if run_file.is_file() else None
    promote = settings.promote
    if not data_dir.is_dir():
        fail(f"{data_dir}: dataset folder not found")
    try:
        split = registry.split_hash(splits)
    except registry.RegistryError as exc:
        fail(str(exc))
    trained_on, test_images = _split_names(splits)
    evaluate = evaluate or split_evaluator(settings, splits)
    check = check or smoke_checker(settings)

    tracking.configure(settings.tracking.uri, settings.tracking.experiment, settings.tracking.artifacts)
    try:
        summary = evaluate(model_uri)  # loads and runs the model: an unusable one stops here
    except Exception as exc:  # any failure of loading or running a stored model
        fail(
            f"{model_uri}: cannot be loaded and scored on the test split ({type(exc).__name__}: {exc}); not registered"
        )
    try:
        registry.lookup_metric(summary, promote.metric)
    except KeyError:
        fail(f"the evaluation of {model_uri} has no {promote.metric!r} (promote.metric); not registered")
    try:
        version, decision = registry.register_and_promote(
            model_uri,
            promote.model_name,
            summary,
            dataset_hash=tracking.dataset_hash(data_dir),
            split_hash=split,
            git_commit=tracking.git_commit(),
            params_hash=settings.digest(),
            run_id=run_id,
            trained_on=trained_on,
            metric=promote.metric,
            tie_breaker=promote.tie_breaker,
            evaluate=evaluate,
            test_images=test_images,
            check=check,
        )
        state = registry.registry_state(promote.model_name)
    except registry.RegistryError as exc:
        fail(str(exc))
    typer.echo(f"registered {model_uri} as {promote.model_name} v{version} (alias {registry.CHALLENGER})")
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
    _write_report(out, result)
    return result


def skip_registration(
    settings: Params, policy: RegistrationDecision, model_dir: Path, out: Path | None, force: bool = False
) -> dict[str, Any]:
    """Record in ``out`` that the model of ``model_dir`` was not registered, and why (``policy``); nothing is
    loaded, scored or written to the registry. Returns what ``out`` holds."""
    _claim_report(out, [], force)
    uri_file = model_dir / "model_uri"
    result = {
        "model_name": settings.promote.model_name,
        "version": None,
        "source": uri_file.read_text().strip() if uri_file.is_file() else None,
        "registration": policy.to_dict(),
    }
    typer.secho(f"{settings.promote.model_name}: not registered. {policy.reason}", fg=typer.colors.YELLOW)
    _write_report(out, result)
    return result


def _predictor(settings: Params, model_uri: str) -> Any:
    """The model at ``model_uri`` with the tiling and post-processing of params (as `nucleiseg score`)."""
    from nucleiseg.infer import InferSettings, PostSettings, load_predictor, settings_from

    predictor = load_predictor(model_uri, device=settings.train.device)
    predictor.infer = settings_from(InferSettings, settings.infer.model_dump())
    predictor.post = settings_from(PostSettings, settings.post.model_dump())
    return predictor


def split_evaluator(settings: Params, splits: Path) -> Evaluator:
    """Score a model on the current test split, as the evaluate stage does (the gate's own figures)."""

    def evaluate(model_uri: str) -> dict[str, Any]:
        from nucleiseg.evaluation import evaluate_model, split_items

        items = split_items(settings.data.dir, splits, "test", settings.eval.ignore_suffix)
        typer.echo(f"scoring {model_uri} on the current test split ({len(items)} images)")
        return evaluate_model(_predictor(settings, model_uri), items)["summary"]

    return evaluate


def smoke_checker(settings: Params) -> Checker:
    """Load a model and predict one small synthetic tile: what a version must survive to become champion."""

    def check(model_uri: str) -> None:
        from nucleiseg.synth import synth_tile

        image, _ = synth_tile(0, 96)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a stain normaliser may find too little tissue in a tiny tile
            _predictor(settings, model_uri).label(image)

    return check


@app.command("register")
def register_command(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Output of `nucleiseg train` (default: train.out_dir).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="The annotated dataset, hashed (default: data.dir).")
    ] = None,
    splits: Annotated[
        Path | None, typer.Option("--splits", help="The split definition, hashed (default: data.prepared/splits.json).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the registry summary JSON.")] = DEFAULT_REPORT,
    force: ForceOption = False,
) -> None:
    """Score the trained model on the current test split, register it as a new version (alias challenger) tagged
    with those figures and its provenance, then run the promotion gate: it becomes champion only if it beats
    the champion and passes a smoke test. Scoring uses the params sections infer and post, as `nucleiseg score`.
    Inside `dvc exp run` it registers nothing (and records why in --out) unless promote.registration is always."""
    settings = read_params(params, set_)
    splits = splits or Path(settings.data.prepared) / "splits.json"
    policy = registration_decision(settings.promote.registration, os.environ)
    if not policy.register:
        skip_registration(settings, policy, model_dir or Path(settings.train.out_dir), out, force)
        typer.echo(f"-> {out}")
        return
    register_from_files(
        settings,
        model_dir or Path(settings.train.out_dir),
        data_dir or Path(settings.data.dir),
        splits,
        out,
        force=force,
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
    force: ForceOption = False,
) -> None:
    """Promote a model version to champion: with --version, deliberately (recorded as manual; the version must
    still pass the smoke test: load, predict a tile); without, run the promotion gate on the current challenger.
    A gate that fails (a model that cannot be scored or loaded) changes no tag and no alias."""
    settings = read_params(params, set_)
    from nucleiseg import registry, tracking

    _claim_report(out, [], force)
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
            decision = registry.promote_version(name, version, reason, check=smoke_checker(settings))
        else:
            decision = registry.promote_challenger(
                name,
                settings.promote.metric,
                settings.promote.tie_breaker,
                split_hash=split,
                evaluate=split_evaluator(settings, splits) if split is not None else None,
                test_images=test_images,
                check=smoke_checker(settings),
            )
        state = registry.registry_state(name)
    except registry.RegistryError as exc:
        fail(str(exc))
    _echo_decision(decision, name)
    typer.echo("aliases: " + ", ".join(f"{a}=v{v}" for a, v in state["aliases"].items()))
    _write_report(out, {"model_name": name, "aliases": state["aliases"], "decision": decision.to_dict()})
