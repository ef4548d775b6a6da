"""Hyperparameter search as a Prefect flow: ``open-study -> trials -> summarize`` (:mod:`nucleiseg.tuning`).

``nucleiseg tune`` runs this flow. Several of them, started at once on one machine or several against the
same ``tune.storage``, add trials to one study::

    nucleiseg tune --n-trials 10 &                                   # worker 1
    nucleiseg tune --n-trials 10 &                                   # worker 2, same study
    nucleiseg tune --n-trials 10 --storage postgresql://user@db/optuna   # or a shared RDB / journal file
    nucleiseg tune --apply                                           # copy reports/best_params.yaml into params.yaml

The flow's steps: ``open-study`` checks the prepared data and creates or joins the study and its MLflow
parent run; ``trials`` trains the trials (one training run each, pruned on per-epoch validation scores);
``summarize`` writes the best settings (``tune.out``) and gives the parent run the plots and the trial table.
A Markdown artifact (key ``tune-study``) records the outcome. No caching and no retries: trials are
training runs, and a failed trial is already recorded as such by Optuna.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from nucleiseg.params import Params
from nucleiseg.tuning import StudySession, TuneSummary, finish_session, run_trials, start_session

ARTIFACT_KEY = "tune-study"


@task(name="open-study", cache_policy=NO_CACHE)
def open_study_task(params: Params, prepared_dir: str, track: bool) -> StudySession:
    """Create or join the study in ``tune.storage``; start or find its MLflow parent run."""
    session = start_session(params, prepared_dir, track=track)
    get_run_logger().info(
        "%s study %r (sampler seed %d), parent run %s",
        "created" if session.created else "joined",
        session.study.study_name,
        session.seed,
        session.parent_run_id or "-",
    )
    return session


@task(name="trials", cache_policy=NO_CACHE)
def trials_task(session: StudySession, n_trials: int, timeout: float | None) -> list[int]:
    """Run this worker's trials; each one is logged as it ends."""
    logger = get_run_logger()
    return run_trials(session, n_trials, timeout=timeout, echo=logger.info)


@task(name="summarize", cache_policy=NO_CACHE)
def summarize_task(session: StudySession, best_out: str | None, trials_here: list[int]) -> TuneSummary:
    """Write the best settings and the parent run's plots and trial table."""
    return finish_session(session, best_out, trials_here)


@flow(name="tune")
def tune(
    settings: dict[str, Any],
    prepared_dir: str,
    best_out: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Add ``n_trials`` (default ``tune.n_trials``) trials to the study of ``settings['tune']``."""
    params = Params.model_validate(settings)
    session = open_study_task(params, prepared_dir, track)
    trials_here = trials_task(quote(session), n_trials or params.tune.n_trials, timeout)
    summary = summarize_task(quote(session), best_out, trials_here)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(summary), description="Optuna study")
    return summary.as_dict()


def tune_from_params(
    params: Params,
    prepared_dir: str | os.PathLike[str] | None = None,
    best_out: str | os.PathLike[str] | None = None,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run :func:`tune` with the settings (prepared data ``data.prepared``, output ``tune.out`` by default)."""
    return tune(
        settings=params.model_dump(mode="json"),
        prepared_dir=str(prepared_dir if prepared_dir is not None else params.data.prepared),
        best_out=str(best_out if best_out is not None else params.tune.out),
        n_trials=n_trials,
        timeout=timeout,
        track=track,
    )


def summary_markdown(summary: TuneSummary) -> str:
    """The study's outcome as Markdown (the flow's artifact)."""
    lines = [
        f"# Optuna study `{summary.study}`",
        "",
        f"Storage `{summary.storage}`; objective {summary.objective} ({summary.direction}).",
        f"{summary.n_trials} trials: {summary.n_complete} complete, {summary.n_pruned} pruned, "
        f"{summary.n_failed} failed; this run added {len(summary.trials_here)}.",
        "",
    ]
    if summary.best_params is None:
        lines.append("No trial has completed yet: no best settings.")
    else:
        lines += [
            f"Best: trial {summary.best_trial}, {summary.objective} = {summary.best_value:.4f}",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| `{k}` | {v:.6g} |" for k, v in summary.best_params.items()),
            "",
            f"Written to `{summary.best_params_path}`; apply with `nucleiseg tune --apply`.",
        ]
    if summary.parent_run_id:
        lines.append(f"MLflow parent run `{summary.parent_run_id}`.")
    return "\n".join(lines) + "\n"
