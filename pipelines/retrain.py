"""Scheduled retraining when new annotations land (Prefect 3).

``retrain_on_new_annotations`` runs these steps in a project checkout (``repo_dir``)::

    hash the annotated dataset (params ``data.dir``)
      -> same as the champion's ``dataset_hash`` tag (or the latest challenger's)? nothing new: stop
      -> validate it (Great Expectations)                      a failing set stops here: nothing versioned or trained
      -> version it: ``dvc add <data.dir>`` (new ``<data.dir>.dvc``), ``dvc push`` when a remote is configured
      -> ``dvc repro``                                          the whole pipeline; its register stage runs the gate
      -> read ``reports/registry.json``                        new version, promoted or not, and why

Definitions
-----------
new annotations
    The content hash of ``data.dir`` (:func:`nucleiseg.tracking.dataset_hash`, names and bytes of its images and
    label files) differs from the ``dataset_hash`` tag of the champion. The latest registered version (the
    challenger) counts too: when the gate already judged a model trained on exactly these files and kept the
    champion, retraining every night on the same data would only repeat that verdict, so nothing is done.
outcome
    The flow returns a summary dict whose ``action`` is ``none`` (nothing new), ``invalid`` (validation failed;
    ``failures`` and ``offending_files`` say why) or ``retrained`` (``version``, ``promoted``, ``decision``,
    ``reason``, ``champion``). Every outcome is also a Prefect Markdown artifact (key ``retrain``); a failed
    validation adds the validation report (key ``retrain-validation``). An invalid dataset is a reported
    outcome, not a crash: the run completes, and ``nucleiseg retrain`` exits 1.

What a failure leaves behind
----------------------------
The registry changes only in the ``register`` stage, the last stage before ``batch``; so a run that stops
anywhere before it (validation, ``dvc add``, any earlier stage of ``dvc repro``) leaves the champion as it was.
``<data.dir>.dvc`` is copied before ``dvc add``; when ``dvc repro`` fails before a new version was registered,
the copy is put back, so the data version is the previous one too (the new files stay in ``data.dir`` and in
the DVC cache, and the next run tries again). When the failure comes after registration (the ``batch`` stage),
the new ``.dvc`` file is kept: a registered version was trained on it. A run killed outright (SIGKILL) between
``dvc add`` and ``register`` cannot restore the file, but git still holds the previous ``.dvc`` and the next run
repeats the work. The flow never commits to git: committing the new ``.dvc`` file is the user's decision.

Scheduling
----------
:func:`build_deployment` makes the served deployment: the cron schedule and timezone of params ``schedule``,
and a deployment concurrency limit of one with the ``CANCEL_NEW`` collision strategy, so runs never overlap:
a scheduled run that comes while one is still running is cancelled rather than queued (the next run will see
the same new data). ``nucleiseg serve-retrain`` serves it (a long-running process; point ``PREFECT_API_URL``
at a Prefect server to see the runs in its UI).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from nucleiseg import tracking
from nucleiseg.io import write_bytes_atomic
from nucleiseg.params import Params, load_params

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from nucleiseg.validation import ValidationReport

DEPLOYMENT_NAME = "retrain-on-new-annotations"
ARTIFACT_KEY = "retrain"
VALIDATION_ARTIFACT_KEY = "retrain-validation"
REGISTRY_REPORT = Path("reports/registry.json")
LOG_TAIL_LINES = 60


class RetrainError(RuntimeError):
    """A step of the retraining failed (``dvc add``, ``dvc repro``); the message holds the command's log tail."""


# --- helpers ----------------------------------------------------------------------------------------


def resolve_tracking_uri(configured: str, repo_dir: str | os.PathLike[str]) -> str:
    """The tracking URI in force (``MLFLOW_TRACKING_URI`` first), a relative SQLite path made absolute against
    ``repo_dir``: the pipeline's stages run there, so that is where their store lives."""
    uri = tracking.tracking_uri(configured)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            return f"sqlite:///{(Path(repo_dir) / path).resolve()}"
    return uri


def registered_versions(model_name: str, tracking_uri: str) -> dict[str, Any]:
    """The champion and the latest version of ``model_name``, each as ``{"version", "dataset_hash"}`` or None.

    A SQLite store that does not exist yet, or a model never registered, means no versions (nothing is created).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from nucleiseg.registry import CHAMPION, RegistryError, registry_state

    empty: dict[str, Any] = {"champion": None, "latest": None}
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return empty
    try:
        state = registry_state(model_name, tracking_uri=tracking_uri)
    except RegistryError:
        return empty
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def describe(version: str | None) -> dict[str, Any] | None:
        if version is None:
            return None
        try:
            tags = client.get_model_version(model_name, version).tags
        except MlflowException:
            return None
        return {"version": version, "dataset_hash": tags.get("dataset_hash")}

    return {"champion": describe(state["aliases"].get(CHAMPION)), "latest": describe(state["latest_version"])}


def pipeline_env() -> dict[str, str]:
    """The environment for DVC and the ``nucleiseg`` commands of its stages: this interpreter's scripts first on
    PATH, and the Prefect API of this run (when one is set) so the stages' own flows report to the same server."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if "PREFECT_API_URL" not in env:
        from prefect.settings import PREFECT_API_URL

        if api_url := PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = api_url
    return env


def run_logged(args: list[str], cwd: Path, env: dict[str, str], logger: Any) -> tuple[int, str]:
    """Run a command, streaming its output (stdout and stderr merged) to ``logger`` line by line.

    Returns the exit code and the last :data:`LOG_TAIL_LINES` lines of output.
    """
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    with subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info(f"[{args[0]}] {line}")
    return proc.returncode, "\n".join(tail)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The outcome of a run as Markdown (the Prefect artifact)."""
    lines = [f"# Retraining on new annotations: {summary['action']}", "", summary["message"], ""]
    keys = [k for k in summary if k not in ("action", "message", "failures", "offending_files")]
    lines += ["| | |", "|---|---|", *(f"| {k} | {_md_cell(summary[k])} |" for k in keys)]
    if summary.get("failures"):
        lines += ["", "## Failed expectations", "", "| expectation | files |", "|---|---|"]
        lines += [f"| {_md_cell(f['description'])} | {_md_cell(', '.join(f['files']))} |" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


# --- tasks ------------------------------------------------------------------------------------------


@task(name="dataset-hash", cache_policy=NO_CACHE)
def hash_dataset(data_dir: Path) -> str:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: annotated dataset folder (params data.dir) not found")
    return tracking.dataset_hash(data_dir)


@task(name="registered-versions", cache_policy=NO_CACHE)
def registered_versions_task(model_name: str, tracking_uri: str) -> dict[str, Any]:
    return registered_versions(model_name, tracking_uri)


@task(name="validate", cache_policy=NO_CACHE)
def validate_annotations(data_dir: Path, settings: Params) -> ValidationReport:
    from nucleiseg.validation import validate_dataset

    report = validate_dataset(data_dir, settings.checks, None, settings.data.ignore_suffix)
    if not report.success:
        create_markdown_artifact(
            key=VALIDATION_ARTIFACT_KEY, markdown=report.to_markdown(), description=f"Validation of {data_dir}"
        )
    return report


@task(name="dvc-add", cache_policy=NO_CACHE)
def version_annotations(root: Path, data_rel: str) -> bool:
    """``dvc add`` the dataset, then ``dvc push`` it when a default remote is set; returns whether it was pushed.

    A failed push only warns: the data is versioned locally and the next push sends it.
    """
    logger, env = get_run_logger(), pipeline_env()
    code, tail = run_logged(["dvc", "add", data_rel], root, env, logger)
    if code != 0:
        raise RetrainError(
            f"`dvc add {data_rel}` failed (exit {code}); data.dir must be a folder versioned with `dvc add`, "
            f"not a pipeline output:\n{tail}"
        )
    remote = subprocess.run(["dvc", "remote", "default"], cwd=root, env=env, capture_output=True, text=True)
    if remote.returncode != 0 or not remote.stdout.strip():
        logger.info("no default DVC remote configured: the data version stays in the local cache")
        return False
    code, tail = run_logged(["dvc", "push", f"{data_rel}.dvc"], root, env, logger)
    if code != 0:
        logger.warning(f"`dvc push` to remote {remote.stdout.strip()!r} failed (exit {code}); push it later:\n{tail}")
        return False
    return True


@task(name="dvc-repro", cache_policy=NO_CACHE)
def run_pipeline(root: Path) -> None:
    code, tail = run_logged(["dvc", "repro"], root, pipeline_env(), get_run_logger())
    if code != 0:
        raise RetrainError(f"`dvc repro` failed (exit {code}) in {root}; the end of its log:\n{tail}")


# --- the flow ---------------------------------------------------------------------------------------


def _finish(summary: dict[str, Any]) -> dict[str, Any]:
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(summary), description=summary["message"])
    get_run_logger().info(summary["message"])
    return summary


@flow(name="retrain-on-new-annotations")
def retrain_on_new_annotations(repo_dir: str = ".", params_path: str = "params.yaml") -> dict[str, Any]:
    """Retrain when the annotated dataset changed since the champion was trained (see the module docstring).

    ``repo_dir``: the project checkout (DVC and git repository); ``params_path``: its settings, relative to
    ``repo_dir`` unless absolute. Returns the summary dict (``action``: ``none``, ``invalid`` or ``retrained``).
    """
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    settings = load_params(root / params_path)
    data_rel = settings.data.dir
    data_dir = root / data_rel
    model_name = settings.promote.model_name
    uri = resolve_tracking_uri(settings.tracking.uri, root)

    current = hash_dataset(data_dir)
    versions = registered_versions_task(model_name, uri)
    champion, latest = versions["champion"], versions["latest"]
    base = {
        "dataset_hash": current,
        "data_dir": str(data_dir),
        "champion_before": champion and champion["version"],
        "champion_dataset_hash": champion and champion["dataset_hash"],
    }
    if champion is not None and champion["dataset_hash"] == current:
        message = f"nothing new: {data_rel} (hash {current}) is what champion v{champion['version']} was trained on"
        return _finish({"action": "none", "message": message, **base})
    if latest is not None and latest["dataset_hash"] == current:
        message = (
            f"nothing new: {data_rel} (hash {current}) is what v{latest['version']} was trained on, and the "
            f"promotion gate already judged it (champion: v{base['champion_before']})"
        )
        return _finish({"action": "none", "message": message, **base})
    logger.info(
        f"{data_rel} changed: hash {current}, champion "
        + (f"v{champion['version']} trained on {champion['dataset_hash']}" if champion else "none yet")
    )

    report = validate_annotations(data_dir, settings)
    if not report.success:
        failures = [
            {"expectation": f.expectation, "description": f.description, "files": f.files} for f in report.failures
        ]
        message = (
            f"{data_rel} failed validation ({len(report.failures)} expectation(s), files: "
            f"{', '.join(report.offending_files) or 'see the report'}); nothing versioned, trained or promoted"
        )
        logger.error(report.summary())
        return _finish(
            {
                "action": "invalid",
                "message": message,
                **base,
                "offending_files": report.offending_files,
                "failures": failures,
            }
        )

    dvc_file = root / f"{data_rel}.dvc"
    previous_dvc = dvc_file.read_bytes() if dvc_file.is_file() else None
    latest_before = latest and latest["version"]
    try:
        pushed = version_annotations(root, data_rel)
        run_pipeline(root)
    except BaseException:
        try:
            after = registered_versions(model_name, uri)["latest"]
        except Exception:  # the store is unreadable: no version can have been registered through it either
            after = latest
        if (after and after["version"]) != latest_before:
            logger.error(f"the pipeline failed after registering v{after['version']}: keeping the new {dvc_file.name}")
        elif previous_dvc is None:
            dvc_file.unlink(missing_ok=True)
            logger.error(f"the pipeline failed: removed {dvc_file.name}, which did not exist before this run")
        elif dvc_file.is_file() and dvc_file.read_bytes() != previous_dvc:
            write_bytes_atomic(dvc_file, previous_dvc)
            logger.error(f"the pipeline failed: restored the previous {dvc_file.name}; the champion is unchanged")
        raise

    registry = json.loads((root / REGISTRY_REPORT).read_text())
    decision = registry["decision"]
    if registry["version"] == latest_before:
        raise RetrainError(f"`dvc repro` registered no new version ({REGISTRY_REPORT} still names v{latest_before})")
    champion_now = registry["aliases"].get("champion")
    message = (
        f"retrained on {data_rel} (hash {current}): {model_name} v{registry['version']} {decision['decision']}; "
        f"champion v{champion_now}. {decision['reason']}"
    )
    return _finish(
        {
            "action": "retrained",
            "message": message,
            **base,
            "data_dvc": str(dvc_file),
            "pushed": pushed,
            "version": registry["version"],
            "promoted": decision["promoted"],
            "decision": decision["decision"],
            "reason": decision["reason"],
            "scores": decision["scores"],
            "champion": champion_now,
        }
    )


def build_deployment(
    settings: Params, repo_dir: str | os.PathLike[str] = ".", params_path: str = "params.yaml"
) -> RunnerDeployment:
    """The served deployment: the flow on the cron schedule of ``settings.schedule`` (in its timezone), with a
    concurrency limit of one whose collision strategy cancels a run that would overlap the current one."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return retrain_on_new_annotations.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(settings.schedule.cron, timezone=settings.schedule.timezone)],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"repo_dir": str(Path(repo_dir).resolve()), "params_path": str(params_path)},
        description="Retrain, validate and let the promotion gate decide when the annotated dataset changes.",
        tags=["nucleiseg", "retrain"],
        # the installed module, not a file path: the runner can start runs whatever its working directory
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(settings: Params, repo_dir: str | os.PathLike[str] = ".", params_path: str = "params.yaml") -> None:
    """Serve :func:`build_deployment` until interrupted; the runner itself also executes one run at a time."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(settings, repo_dir, params_path), limit=1)


__all__ = [
    "DEPLOYMENT_NAME",
    "RetrainError",
    "build_deployment",
    "registered_versions",
    "resolve_tracking_uri",
    "retrain_on_new_annotations",
    "serve",
]
