"""Scheduled retraining when new annotations land (Prefect 3).

``retrain_on_new_annotations`` runs these steps in a project checkout (``repo_dir``)::

    take in the annotations inbox (params ``data.inbox``; :mod:`nucleiseg.inbox` defines each step)
      -> nothing there: go on with the dataset as it is
      -> stage it: QuPath GeoJSON imported (nucleiseg.qupath, class_map.yaml), label PNGs as they are
      -> validate the dataset the merge would make (Great Expectations)
                                                      a failing set is refused: moved to <inbox>/.refused/<stamp>/
                                                      with REASON.txt; nothing is merged, versioned or trained
      -> ``dvc add`` + ``dvc push`` the dataset before the merge, so the labels being replaced are versioned
      -> merge into ``data.dir`` (a corrected tile replaces its earlier version), archive the inbox files in
         <inbox>/.done/<stamp>/ with the replaced files and ``record.json``
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
    The flow returns a summary dict whose ``action`` is ``none`` (nothing new), ``refused`` (the inbox set failed
    its import or validation; ``reason``, ``refused_files`` and ``archive`` say why and where it went),
    ``invalid`` (the dataset itself failed validation; ``failures`` and ``offending_files`` say why) or
    ``retrained`` (``version``, ``promoted``, ``decision``, ``reason``, ``champion``); ``trigger`` says what
    started the run and ``inbox`` what landed and what was merged. Every outcome is also a Prefect Markdown
    artifact (key ``retrain``); a failed validation adds the validation report (key ``retrain-validation``), and
    a run that took in the inbox writes the summary to ``record.json`` of its archive folder. A refused or
    invalid set is a reported outcome, not a crash: the run completes, and ``nucleiseg retrain`` exits 1.
previous labels
    A replaced tile's earlier files are in the DVC cache and remote under the ``.dvc`` file of before the merge
    (kept as ``<inbox>/.done/<stamp>/<data.dir>.dvc.before``; ``git log -p data.dvc`` once committed):
    ``cp inbox/.done/<stamp>/data.dvc.before data.dvc && dvc checkout data`` brings them back. A copy is also in
    ``replaced/`` beside the record.

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

Triggers and scheduling
-----------------------
:func:`build_deployment` makes the served deployment with two ways to start: an event trigger on the inbox
event of :mod:`pipelines.inbox_watch` (one event per burst of arrivals, debounced by the watcher), and the cron
schedule and timezone of params ``schedule``, kept as the fallback (annotations put into ``data.dir`` by hand,
an event lost while the service was down). Runs never overlap, by two locks: the deployment's concurrency
limit of one, with the ``ENQUEUE`` collision strategy (a run that comes while one is running waits for it, then
takes in what arrived meanwhile, or finds nothing new and ends in seconds; cancelling it instead would strand
files that landed during a long training until the next night), and a file lock, ``<inbox>/.work/retrain.lock``,
held by the flow itself, which also keeps a manual ``nucleiseg retrain`` from running beside a served run (the
second one fails at once, saying so). :func:`serve` runs the whole service: a local Prefect server when
``PREFECT_API_URL`` is not set (:mod:`pipelines.prefect_server` says why the ephemeral API cannot do), the
deployment, and the inbox watcher, all stopped by Ctrl-C.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

from nucleiseg import inbox as inbox_lib
from nucleiseg import tracking
from nucleiseg.io import write_bytes_atomic
from nucleiseg.params import Params, load_params
from pipelines.inbox_watch import INBOX_EVENT, inbox_resource

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from nucleiseg.validation import ValidationReport

DEPLOYMENT_NAME = "retrain-on-new-annotations"
ARTIFACT_KEY = "retrain"
VALIDATION_ARTIFACT_KEY = "retrain-validation"
REGISTRY_REPORT = Path("reports/registry.json")
CLASS_MAP = Path("class_map.yaml")  # QuPath class names -> the project's classes, at the project's root
WORK_DIR = ".work"  # in the inbox, hidden from the watcher and the scan: the lock and the staging folders
LOCK_NAME = "retrain.lock"
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
    keys = [k for k in summary if k not in ("action", "message", "failures", "offending_files", "inbox")]
    lines += ["| | |", "|---|---|", *(f"| {k} | {_md_cell(summary[k])} |" for k in keys)]
    if intake := summary.get("inbox"):
        lines += ["", f"## Inbox `{intake['inbox']}`: {intake['action']}", ""]
        lines += [f"- landed: {', '.join(intake['landed']) or 'nothing'}"]
        for key in ("added", "replaced", "removed", "waiting", "unrecognised", "kept"):
            if intake.get(key):
                lines.append(f"- {key}: {', '.join(intake[key])}")
        if intake.get("archive"):
            lines.append(f"- archive: `{intake['archive']}`")
        if intake.get("tiles"):
            lines += ["", "| tile | kind | nuclei | replaces | from |", "|---|---|---|---|---|"]
            for tile in intake["tiles"]:
                nuclei = ", ".join(f"{n} {c}" for c, n in tile["nuclei"].items())
                lines.append(
                    f"| {tile['name']} | {tile['kind']} | {nuclei} | {tile['replaces']} | "
                    f"{_md_cell(', '.join(tile['sources']))} |"
                )
        if intake.get("reason"):
            lines += ["", "```", intake["reason"], "```"]
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


# --- the inbox --------------------------------------------------------------------------------------


def inbox_dir(root: Path, settings: Params) -> Path:
    """params ``data.inbox``, relative to the project checkout unless absolute."""
    inbox = Path(settings.data.inbox)
    return inbox if inbox.is_absolute() else root / inbox


def qupath_reader(root: Path) -> inbox_lib.QupathReader:
    """:func:`nucleiseg.qupath.read_qupath_geojson` with the project's class map (``class_map.yaml``)."""
    from nucleiseg.qupath import load_class_map, read_qupath_geojson

    class_map = load_class_map(root / CLASS_MAP)
    return lambda path, shape: read_qupath_geojson(path, shape, class_map)


@task(name="inbox-scan", cache_policy=NO_CACHE)
def scan_inbox_task(inbox: Path, data_dir: Path, ignore_suffix: str) -> inbox_lib.InboxScan:
    return inbox_lib.scan_inbox(inbox, data_dir, ignore_suffix)


@task(name="inbox-stage", cache_policy=NO_CACHE)
def stage_inbox(
    scan: inbox_lib.InboxScan, root: Path, data_dir: Path, staging_dir: Path, ignore_suffix: str
) -> tuple[list[inbox_lib.StagedTile], list[tuple[list[Path], str]]]:
    """Stage every submission; returns the staged tiles and the errors (files, message), scan errors included."""
    staged: list[inbox_lib.StagedTile] = []
    errors = list(scan.errors)
    reader: inbox_lib.QupathReader | None = None
    for submission in scan.submissions:
        try:
            if submission.kind == "qupath" and reader is None:
                try:
                    reader = qupath_reader(root)
                except (ImportError, OSError, ValueError) as exc:
                    raise inbox_lib.InboxError(f"{submission.annotation}: cannot read QuPath GeoJSON: {exc}") from exc
            staged.append(inbox_lib.stage_submission(submission, data_dir, staging_dir, reader, ignore_suffix))
        except inbox_lib.InboxError as exc:
            errors.append((submission.files, str(exc)))
    return staged, errors


@task(name="inbox-merge", cache_policy=NO_CACHE)
def merge_inbox(
    data_dir: Path, staging_dir: Path, staged: list[inbox_lib.StagedTile], replaced_dir: Path, ignore_suffix: str
) -> dict[str, list[str]]:
    return inbox_lib.merge_staged(data_dir, staging_dir, staged, replaced_dir, ignore_suffix)


def _refusal(
    errors: list[tuple[list[Path], str]], report: ValidationReport | None, staged: list[inbox_lib.StagedTile]
) -> str:
    """Why a set is refused: each import error naming its file, then the failed expectations, each offending file
    said to come from the inbox or to be in the dataset already."""
    lines = [message for _, message in errors]
    if report is not None and not report.success:
        from_inbox = {name for tile in staged for name in tile.files}
        where = ", ".join(
            f"{f} ({'from the inbox' if f in from_inbox else 'in the dataset'})" for f in report.offending_files
        )
        lines += [f"validation failed: {where}", report.summary()]
    return "\n".join(lines)


def take_in_inbox(root: Path, settings: Params, stamp: str) -> dict[str, Any]:
    """Stage, validate and merge what the inbox holds (module docstring); returns what happened (``action``:
    ``empty``, ``refused`` or ``merged``) with what landed, and for a merge ``validated_hash``, the content hash
    of the dataset the merge made, which the suite has just checked."""
    logger = get_run_logger()
    inbox, data_rel, ignore = inbox_dir(root, settings), settings.data.dir, settings.data.ignore_suffix
    data_dir = root / data_rel
    scan = scan_inbox_task(inbox, data_dir, ignore)
    info: dict[str, Any] = {
        "inbox": str(inbox),
        "landed": [p.name for p in scan.files],
        "waiting": scan.waiting,
        "unrecognised": scan.unrecognised,
    }
    if scan.waiting or scan.unrecognised:
        logger.info(f"left in the inbox: waiting {scan.waiting}, not recognised {scan.unrecognised}")
    if not scan.files:
        return {"action": "empty", **info}
    dvc_file = root / f"{data_rel}.dvc"
    if dvc_file.is_file() and not data_dir.is_dir():
        raise RetrainError(f"{data_rel} is versioned by {dvc_file.name} but absent: `dvc pull` it before merging")
    work = Path(tempfile.mkdtemp(prefix=f"staging-{stamp}-", dir=inbox / WORK_DIR))
    try:
        staged, errors = stage_inbox(scan, root, data_dir, work / "tiles", ignore)
        info["tiles"] = [dataclasses.asdict(tile) for tile in staged]
        report = None
        if not errors:
            candidate = inbox_lib.build_candidate(data_dir, work / "tiles", staged, work / "candidate", ignore)
            report = validate_annotations(candidate, settings)
        if errors or (report is not None and not report.success):
            reason = _refusal(errors, report, staged)
            refused = inbox_lib.archive_folder(inbox, inbox_lib.REFUSED, stamp)
            moved = inbox_lib.archive_files(scan, scan.files, refused)
            info.update(action="refused", reason=reason, archive=str(refused), refused_files=moved["moved"])
            info["kept"] = moved["kept"]
            if report is not None:
                info["offending_files"] = report.offending_files
            inbox_lib.write_record(refused, info, reason)
            logger.error(f"inbox set refused, moved to {refused}:\n{reason}")
            return info
        validated_hash = tracking.dataset_hash(work / "candidate")
        version_before = None
        if data_dir.is_dir():
            # the dataset as it is now, versioned before anything is replaced: its labels stay recoverable
            version_annotations(root, data_rel)
            version_before = dvc_file.read_bytes()
        done = inbox_lib.archive_folder(inbox, inbox_lib.DONE, stamp)
        if version_before is not None:
            write_bytes_atomic(done / f"{Path(data_rel).name}.dvc.before", version_before)
        merged = merge_inbox(data_dir, work / "tiles", staged, done / "replaced", ignore)
        moved = inbox_lib.archive_files(scan, [p for s in scan.submissions for p in s.files], done)
        info.update(action="merged", archive=str(done), validated_hash=validated_hash, kept=moved["kept"], **merged)
        inbox_lib.write_record(done, info)
        logger.info(f"merged into {data_rel}: added {merged['added']}, replaced {merged['replaced']}")
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the flow ---------------------------------------------------------------------------------------


def _finish(summary: dict[str, Any]) -> dict[str, Any]:
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(summary), description=summary["message"])
    get_run_logger().info(summary["message"])
    return summary


@flow(name="retrain-on-new-annotations")
def retrain_on_new_annotations(
    repo_dir: str = ".", params_path: str = "params.yaml", trigger: str = "manual"
) -> dict[str, Any]:
    """Take in the inbox, then retrain when the annotated dataset changed since the champion was trained (see the
    module docstring).

    ``repo_dir``: the project checkout (DVC and git repository); ``params_path``: its settings, relative to
    ``repo_dir`` unless absolute; ``trigger``: what started the run (recorded). Returns the summary dict
    (``action``: ``none``, ``refused``, ``invalid`` or ``retrained``).
    """
    root = Path(repo_dir).resolve()
    settings = load_params(root / params_path)
    work = inbox_dir(root, settings) / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    try:
        lock = filelock.FileLock(work / LOCK_NAME, timeout=0)
        lock.acquire()
    except filelock.Timeout:
        raise RetrainError(f"another retraining run holds {work / LOCK_NAME}; this one does nothing") from None
    try:
        intake = take_in_inbox(root, settings, inbox_lib.run_stamp())
        record = {"trigger": trigger, "inbox": intake}
        if intake["action"] == "refused":
            message = (
                f"inbox set refused ({len(intake['refused_files'])} file(s), moved to {intake['archive']}); "
                f"nothing merged, versioned or trained. {intake['reason'].splitlines()[0]}"
            )
            summary = _finish({"action": "refused", "message": message, **record})
            inbox_lib.write_record(intake["archive"], summary, intake["reason"])
            return summary
        try:
            summary = _retrain_dataset(root, settings, record, intake.get("validated_hash"))
        except Exception as exc:
            if intake["action"] == "merged":
                inbox_lib.write_record(intake["archive"], {**record, "action": "failed", "error": str(exc)})
            raise
        if intake["action"] == "merged":
            inbox_lib.write_record(intake["archive"], summary)
        return summary
    finally:
        lock.release()


def _retrain_dataset(
    root: Path, settings: Params, record: dict[str, Any], validated_hash: str | None
) -> dict[str, Any]:
    """The dataset part of the flow: hash, compare, validate (unless ``validated_hash`` is the dataset's: the
    inbox step has just checked exactly these files), version, ``dvc repro``, the gate's decision."""
    logger = get_run_logger()
    data_rel = settings.data.dir
    data_dir = root / data_rel
    model_name = settings.promote.model_name
    uri = resolve_tracking_uri(settings.tracking.uri, root)

    current = hash_dataset(data_dir)
    versions = registered_versions_task(model_name, uri)
    champion, latest = versions["champion"], versions["latest"]
    base = {
        **record,
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

    if current == validated_hash:
        logger.info(f"{data_rel} is the dataset the inbox step validated (hash {current})")
    else:
        report = validate_annotations(data_dir, settings)
    if current != validated_hash and not report.success:
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
    """The served deployment (module docstring): an event trigger on the inbox event of this project's inbox,
    the cron schedule of ``settings.schedule`` (in its timezone) as the fallback, and a concurrency limit of one
    whose collision strategy enqueues a run that would overlap the current one."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    root = Path(repo_dir).resolve()
    inbox = inbox_dir(root, settings)
    on_inbox_event = DeploymentEventTrigger(
        name=f"{DEPLOYMENT_NAME}: annotations arrived in {inbox}",
        expect={INBOX_EVENT},
        match={"prefect.resource.id": inbox_resource(inbox)["prefect.resource.id"]},
        # one run per event: the watcher has already made one event of each burst
        posture="Reactive",
        threshold=1,
        parameters={"trigger": "inbox event: {{ event.payload.files | join(', ') }}"},
    )
    return retrain_on_new_annotations.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[
            Cron(settings.schedule.cron, timezone=settings.schedule.timezone, parameters={"trigger": "schedule"})
        ],
        triggers=[on_inbox_event],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"repo_dir": str(root), "params_path": str(params_path)},
        description="Take in corrected annotations, validate, version, retrain and let the promotion gate decide.",
        tags=["nucleiseg", "retrain"],
        # the installed module, not a file path: the runner can start runs whatever its working directory
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(
    settings: Params,
    repo_dir: str | os.PathLike[str] = ".",
    params_path: str = "params.yaml",
    port: int = 4200,
    server_log: str | os.PathLike[str] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the retraining service until interrupted (Ctrl-C, SIGTERM): the Prefect server at ``PREFECT_API_URL``,
    or a local one started on ``port`` (its log to ``server_log``); the deployment of :func:`build_deployment`
    served by a runner that executes one run at a time; and the inbox watcher, started once the deployment and
    its trigger are registered, so that no event comes before the trigger exists. ``on_ready(api_url)`` is
    called then. Everything started here is stopped on the way out, the server last."""
    from prefect.context import refresh_global_settings_context
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL

    from pipelines.inbox_watch import InboxWatcher, emit_inbox_event
    from pipelines.prefect_server import local_prefect_server

    root = Path(repo_dir).resolve()
    inbox = inbox_dir(root, settings)
    deployment = build_deployment(settings, root, params_path)
    with contextlib.ExitStack() as stack:
        api_url = PREFECT_API_URL.value()
        if not api_url:
            api_url = stack.enter_context(local_prefect_server(port=port, log_path=server_log))
            # in the environment, for the runs' subprocesses and the pipeline's stages, and in the settings every
            # thread falls back on (the watcher's events), which Prefect read from the environment at import
            os.environ["PREFECT_API_URL"] = api_url
            refresh_global_settings_context()
        runner = Runner(limit=1, pause_on_shutdown=True)
        runner.add_deployment(deployment)
        watcher = InboxWatcher(inbox, lambda names: emit_inbox_event(inbox, names), settings.schedule.inbox_quiet_s)
        stack.enter_context(watcher)
        if on_ready is not None:
            on_ready(api_url)
        try:
            _serve_until_interrupted(runner)
        except (KeyboardInterrupt, TerminationSignal):
            pass
        get_logger("nucleiseg.serve-retrain").info("stopping: watcher, runner, then the Prefect server")


def _serve_until_interrupted(runner: Any, grace_s: float = 20.0) -> None:
    """``runner.start()`` until Ctrl-C (SIGINT); then ``runner.astop()`` (cancels its runs), each wait bounded.

    ``asyncio.run`` alone turns Ctrl-C into a cancellation of the runner's task, which Prefect's task groups can
    absorb while a flow run is being wound up (seen once in CI: the service went on for 90 s after Ctrl-C), and
    then waits for every task it cancels. Here a run the runner cannot stop within ``grace_s`` is abandoned (its
    process is the runner's child and ends with the service), so Ctrl-C always ends the service. SIGTERM keeps
    Prefect's own handler (``TerminationSignal``).
    """

    async def until_interrupted() -> None:
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        serving = asyncio.ensure_future(runner.start())
        waiting = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            waiting.cancel()
            serving.result()  # the runner ended on its own (an error, or SIGTERM): let it show
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.astop(), grace_s)
        if not serving.done():
            serving.cancel()
            await asyncio.wait({serving}, timeout=grace_s)  # does not wait for a cancellation that is absorbed

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(until_interrupted())
    finally:
        # Not asyncio.run's clean-up, which would wait again for every task left: they are dropped with the loop.
        loop.close()


__all__ = [
    "DEPLOYMENT_NAME",
    "RetrainError",
    "build_deployment",
    "registered_versions",
    "resolve_tracking_uri",
    "retrain_on_new_annotations",
    "serve",
]
