"""Batch inference (Prefect 3): segment every image of a folder with one trained model, skipping what is done.

:func:`run_batch` loads the model once, maps one ``predict-image`` task over the images, and ends with a
summary of what succeeded, what was skipped and what failed, and why::

    resolve the model (a registry alias becomes a fixed version) -> load it once
      -> for each image: skip if up to date, else predict-image (mapped; threads, or Dask)
      -> OUT_DIR/batch_summary.json + a Prefect Markdown artifact (key ``batch-inference``, in a flow run)

It runs in one of two ways (:mod:`pipelines.execution` defines them and says why): :func:`batch_inference`, a
Prefect flow run, when a Prefect API is configured (``PREFECT_API_URL``, e.g. ``make prefect-server``); else
:func:`run_batch_locally`, the same steps as plain calls without Prefect, because Prefect 3 would otherwise
start a temporary API server on every call (seconds to tens of seconds). :func:`batch` picks; ``nucleiseg
batch`` calls it. Outputs, summary, skipping and failures are the same either way.

Per image ``NAME`` the outputs are those of :func:`nucleiseg.infer.predict_file` (``NAME_label.png``,
``NAME_overlay.png``, ``NAME.geojson``, ``NAME_nuclei.csv``; :func:`nucleiseg.export.output_paths`), each
written atomically, and its spatial report (``NAME_spatial.html``, ``NAME_spatial.json``;
:mod:`nucleiseg.spatial_report`, settings ``spatial``), made by a ``spatial-report`` task from those outputs for
every image predicted, and for a skipped image whose report is missing, changed or made with other settings. A
report that cannot be made is a warning, never a failed image. When the flow runs inside an active MLflow run
(``mlflow.start_run()`` around it), the reports are logged to that run as artifacts under ``spatial/``.

Definitions
-----------
model identity
    What the outputs were computed with: a checkpoint's (or local MLflow model folder's) resolved path and
    content hash, a registered model's
    fixed version (``models:/<name>/<version>``, what ``@champion`` pointed to at load time) and source run, a
    logged model's id, a run's model URI. It is recorded in the summary.
model time
    When that model came to be: a checkpoint's (or MLflow model folder's) modification time, a model version's
    or logged model's ``creation_timestamp``, a run's start time. A version's weights never change after it is
    created; tags and aliases do, so ``last_updated_timestamp`` would needlessly recompute after a promotion.
    Known, it says that the identity pins the model's content; unknown, nothing is reused.
up to date
    An image is skipped (status ``skipped``, with the reason) when the previous ``batch_summary.json`` in
    ``OUT_DIR`` has the same model identity and the same ``infer`` / ``post`` settings, lists the same input
    file (resolved path) as ``ok`` or ``skipped`` with the same content (``input_sha256``, the SHA-256 of its
    bytes), and all four outputs exist as the run wrote them (owned files, :mod:`nucleiseg.outputs`).
    Modification times play no part: ``cp -p``, ``rsync -a`` or ``tar x`` of changed images keep old times
    but change the content. When the model time cannot be known (a remote artifact URI, whose content may
    change under the same name) nothing is skipped.

Output safety (:mod:`nucleiseg.outputs`): ``OUT_DIR`` must be apart from ``INPUT_DIR`` (not it, not inside it,
not holding it), and an existing output file that nucleiseg did not write is replaced only with ``force``;
both are checked before the model is loaded. Every output written is recorded as owned.

Failures: a corrupt or unreadable image (any ``ValueError`` or ``OSError`` of its prediction: unreadable file,
unsupported pixels, a failed write) fails alone: its task completes with a ``failed`` entry whose error names
the file, logged as one warning line (a raised exception would make Prefect log a traceback for what is an
expected outcome). Anything else is a bug and fails its task with the traceback. The flow records every
failure in the summary and still completes: it did its job, which is to process or account for every image.
The caller decides what a failure means (``nucleiseg batch`` exits 1). Only an unusable model or output
folder fails the flow itself (before any image is touched).

Runners: ``runner="threads"`` (default) runs the mapped tasks on ``workers`` threads (default 2; Prefect's
:class:`ThreadPoolTaskRunner` in a flow run) that share the one loaded model (PyTorch and most of the
post-processing release the GIL, so one image's network pass overlaps another's post-processing and writing).
``runner="dask"`` runs them on Dask (``pip install prefect-dask``; ``prefect_dask.DaskTaskRunner`` in a flow
run, a ``dask.distributed`` client's executor without Prefect): a local cluster of ``workers`` processes, or
the scheduler at ``dask_address``. A model cannot be shared across processes, so on Dask each worker process
loads the pinned model once (the batch still loads it first, to fail fast). The runner is a flow argument,
entered inside the flow run, so it is recorded with the run's parameters and its task runs belong to this flow
run. Spatial reports always run on threads of the calling process. ``progress``: a progress bar per step
(images, spatial reports, slide chunks) with the time remaining, on stderr.

Caching: none in Prefect (``NO_CACHE``): the tasks' products are files, and whether they are current is the
up-to-date rule above, which Prefect's input hashing could not express (and the model must not be hashed).
No retries: decoding and inference are deterministic, a retry would fail the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from nucleiseg.export import output_files, output_paths
from nucleiseg.infer import (
    FileResult,
    InferSettings,
    ModelLoadError,
    PostSettings,
    Predictor,
    expand_inputs,
    load_predictor,
    predict_file,
)
from nucleiseg.io import write_json_atomic
from nucleiseg.outputs import OutputError, OutputFolder, file_sha256, is_owned, record_files
from pipelines.execution import (
    RUNNERS,
    LocalMapper,
    Mapper,
    PrefectMapper,
    Runner,
    RunnerError,
    check_prefect_api,
    prefect_api_configured,
    run_logger,
)

if TYPE_CHECKING:
    from nucleiseg.params import Params

SUMMARY_NAME = "batch_summary.json"
ARTIFACT_KEY = "batch-inference"
DEFAULT_MODEL = "models:/nucleiseg@champion"
DEFAULT_WORKERS = 2
# Statuses of earlier runs whose outputs may be reused.
_REUSABLE = ("ok", "skipped")


class BatchInferenceError(RuntimeError):
    """The batch cannot run at all (bad folders, unavailable task runner); the message says what to fix."""


# --- the model: identity, time, loading -------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersionInfo:
    """A model reference resolved to what will actually be loaded (see "model identity" above).

    ``load_ref`` pins the reference (``models:/name@alias`` becomes ``models:/name/<version>``) so that a
    moving alias cannot change the model between resolving and loading, or between Dask workers.
    ``time`` is the model time in seconds since the epoch, None when unknown.
    """

    uri: str
    load_ref: str
    identity: str
    time: float | None
    version: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        created = None if self.time is None else datetime.fromtimestamp(self.time, UTC).isoformat(timespec="seconds")
        return {
            "uri": self.uri,
            "identity": self.identity,
            "version": self.version,
            "run_id": self.run_id,
            "created": created,
        }


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def resolve_model(model_ref: str | os.PathLike[str]) -> ModelVersionInfo:
    """Identity and time of a checkpoint file, a local MLflow model folder or an MLflow model URI.

    ``models:/`` and ``runs:/`` URIs are resolved against the current MLflow tracking and registry URIs
    (``MLFLOW_TRACKING_URI``, or :func:`nucleiseg.tracking.configure`). Raises :class:`ModelLoadError` naming
    the reference when it does not exist (no such model, version or alias).
    """
    ref = os.fspath(model_ref)
    if not ("://" in ref or ref.startswith(("models:/", "runs:/"))):
        path = Path(ref).resolve()
        if path.is_file():
            digest = _sha256(path)
            return ModelVersionInfo(ref, ref, f"{path}#sha256:{digest[:16]}", path.stat().st_mtime)
        if path.is_dir() and (path / "MLmodel").is_file():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            digest = hashlib.sha256()
            for file in files:  # names and bytes: a changed file is a different model, whatever its time
                digest.update(file.relative_to(path).as_posix().encode() + b"\0" + _sha256(file).encode())
            newest = max(p.stat().st_mtime for p in files)
            return ModelVersionInfo(ref, ref, f"{path}#sha256:{digest.hexdigest()[:16]}", newest)
        return ModelVersionInfo(ref, ref, ref, None)  # load_predictor reports what is wrong with it
    return _resolve_mlflow(ref)


def _resolve_mlflow(uri: str) -> ModelVersionInfo:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if uri.startswith("models:/"):
            target = uri.removeprefix("models:/").strip("/")
            if "@" in target:
                name, alias = target.rsplit("@", 1)
                return _version_info(uri, client.get_model_version_by_alias(name, alias))
            name, _, version = target.rpartition("/")
            if name and version.isdigit():
                return _version_info(uri, client.get_model_version(name, version))
            if name and version == "latest":
                found = client.search_model_versions(
                    f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
                )
                if not found:
                    raise ModelLoadError(f"{uri}: registered model {name!r} has no versions")
                return _version_info(uri, found[0])
            if not name and version.startswith("m-"):  # an MLflow 3 logged model id
                logged = client.get_logged_model(version)
                return ModelVersionInfo(
                    uri, uri, uri, logged.creation_timestamp / 1000, run_id=logged.source_run_id
                )  # fmt: skip
        elif uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/", 1)[0]
            run = client.get_run(run_id)
            return ModelVersionInfo(uri, uri, uri, run.info.start_time / 1000, run_id=run_id)
    except MlflowException as exc:
        raise ModelLoadError(f"{uri}: cannot resolve the model ({exc.message})") from None
    return ModelVersionInfo(uri, uri, uri, None)  # stages, remote artifact URIs: no identity beyond the URI


def _version_info(uri: str, mv: Any) -> ModelVersionInfo:
    pinned = f"models:/{mv.name}/{mv.version}"
    identity = f"{pinned} (run {mv.run_id})" if mv.run_id else pinned
    return ModelVersionInfo(uri, pinned, identity, mv.creation_timestamp / 1000, str(mv.version), mv.run_id)


@dataclass(frozen=True)
class ModelSource:
    """What a worker process needs to load the model on its own (Dask): a pinned reference and where MLflow is.

    Small and picklable, unlike the model; :func:`worker_predictor` loads it once per process.
    """

    ref: str
    identity: str
    device: str
    tracking_uri: str | None = None
    registry_uri: str | None = None
    backend: str = "torch"  # infer.backend: torch or onnxruntime


_worker_predictors: dict[ModelSource, Predictor] = {}
_worker_lock = threading.Lock()


def worker_predictor(source: ModelSource) -> Predictor:
    """The predictor of ``source``, loaded once per process (the key includes the model identity, so a
    retrained checkpoint at the same path is loaded again)."""
    with _worker_lock:
        predictor = _worker_predictors.get(source)
        if predictor is None:
            if source.tracking_uri is not None:
                from nucleiseg.tracking import use_store

                use_store(source.tracking_uri, source.registry_uri or source.tracking_uri)
            predictor = _worker_predictors[source] = load_predictor(source.ref, source.device, backend=source.backend)
        return predictor


# --- up to date? ------------------------------------------------------------------------------------


def read_previous_summary(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The previous run's summary in ``out_dir``, or None when there is none or it is unreadable."""
    path = Path(out_dir) / SUMMARY_NAME
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("results"), list) else None


@dataclass
class PlannedImage:
    """One input and what to do with it: ``entry`` is its summary entry when decided without predicting
    (``skipped``, or ``failed`` for a name clash); ``reason`` says why it is computed or skipped."""

    path: Path
    name: str
    reason: str
    entry: dict[str, Any] | None = None
    sha256: str | None = None  # of the input's bytes, recorded as ``input_sha256``


def _setup_change(previous: Mapping[str, Any] | None, identity: str, settings: Mapping[str, Any]) -> str | None:
    """None when ``previous`` was made with this model and these settings; else why its outputs cannot be reused."""
    if previous is None:
        return "no previous summary"
    before = (previous.get("model") or {}).get("identity")
    if before != identity:
        return f"model changed (was {before})"
    if previous.get("settings") != settings:
        return "settings changed"
    return None


def up_to_date(
    sha256: str | None, name: str, out_dir: Path, model_time: float | None, earlier: Mapping[str, Any] | None
) -> tuple[bool, str]:
    """(skip?, reason) for one image of content ``sha256``, given its entry in a previous summary made with the
    same model and settings (None: it has none). See "up to date" in the module docstring."""
    if model_time is None:
        return False, "model time unknown: never skipped"
    if earlier is None:
        return False, "not in the previous summary"
    if earlier.get("status") not in _REUSABLE:
        return False, f"{earlier.get('status')} in the previous run"
    if sha256 is None or earlier.get("input_sha256") != sha256:
        return False, "input content changed"
    # The files the earlier run wrote (its label may be a 32-bit .tif), looked for in this output folder.
    written = earlier.get("outputs") or {}
    outputs = {k: out_dir / Path(v).name for k, v in written.items()} if written else output_paths(out_dir, name)
    missing = [p.name for p in outputs.values() if not p.is_file()]
    if missing:
        return False, f"outputs missing: {', '.join(missing)}"
    changed = [p.name for p in outputs.values() if not is_owned(p)]
    if changed:
        return False, f"outputs changed since they were written: {', '.join(changed)}"
    return True, "up to date: same input content, model and settings; outputs as written"


def plan_images(
    files: list[Path],
    out_dir: Path,
    model: ModelVersionInfo,
    settings: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
) -> list[PlannedImage]:
    """Decide, per input, whether to predict it or skip it (``previous``: the last summary in ``out_dir``).

    Two inputs with the same file stem would write the same outputs: the later one fails, naming both.
    """
    change = _setup_change(previous, model.identity, settings)
    earlier: dict[Path, Mapping[str, Any]] = {}
    if change is None and previous is not None:
        earlier = {Path(r["input"]).resolve(): r for r in previous["results"] if isinstance(r, dict) and "input" in r}
    planned: list[PlannedImage] = []
    used: dict[str, Path] = {}
    for path in files:
        name = path.stem
        if name in used:
            error = f"{path}: output name {name!r} already used by {used[name]}"
            planned.append(PlannedImage(path, name, error, FileResult(str(path), name, "failed", error).as_dict()))
            continue
        used[name] = path
        before = earlier.get(path.resolve())
        try:
            sha256: str | None = file_sha256(path)
        except OSError:  # unreadable: its prediction fails and says why
            sha256 = None
        skip, reason = up_to_date(sha256, name, out_dir, model.time, before)
        if skip and before is not None:
            entry = {**before, "input": str(path), "status": "skipped", "reason": reason, "seconds": 0.0}
            planned.append(PlannedImage(path, name, reason, entry, sha256))
        else:
            planned.append(PlannedImage(path, name, change or reason, sha256=sha256))
    return planned


# --- tasks ------------------------------------------------------------------------------------------


def predict_image(
    path: str,
    name: str,
    out_dir: str,
    model: Predictor | ModelSource,
    infer: InferSettings,
    post: PostSettings,
) -> dict[str, Any]:
    """Segment one image and write its four outputs (recorded as owned); a bad image (``ValueError``,
    ``OSError``) gives a ``failed`` entry naming the file, anything else raises (see "Failures")."""
    predictor = model if isinstance(model, Predictor) else worker_predictor(model)
    started = time.perf_counter()
    try:
        result = predict_file(predictor, path, out_dir, infer, post, name)
    except (ValueError, OSError) as exc:
        error = _error_message(path, exc)
        run_logger().warning(f"failed: {error}")
        seconds = round(time.perf_counter() - started, 3)
        return FileResult(path, name, "failed", error, seconds=seconds).as_dict()
    record_files(out_dir, result.outputs.values())
    return result.as_dict()


# A module-level function under its own name, so that Dask workers unpickle it by reference (LocalMapper).
predict_image_task = task(
    predict_image, name="predict-image", task_run_name="predict-{name}", cache_policy=NO_CACHE, persist_result=False
)


def spatial_report(image_path: str, name: str, out_dir: str, spatial: Any, default_mpp: float) -> dict[str, Any]:
    """Write ``NAME_spatial.html`` / ``.json`` from ``NAME_nuclei.csv``, ``NAME_label.png`` and the image (recorded
    as owned); returns their paths, or ``{"error": ...}`` for a report that cannot be made. ``default_mpp``: the
    scale of a table without rows (which carries no ``um_per_px``)."""
    from nucleiseg.io import read_image
    from nucleiseg.labels import label_file, read_label
    from nucleiseg.measure import read_table
    from nucleiseg.spatial_report import write_spatial_report

    outputs = output_paths(out_dir, name)
    try:
        table = read_table(outputs["nuclei"])
        mpp = float(table["um_per_px"].iloc[0]) if len(table) and "um_per_px" in table else default_mpp
        paths = write_spatial_report(
            table, out_dir, mpp=mpp, thumbnail=read_image(image_path),
            label=read_label(label_file(out_dir, name) or outputs["label"]),  # a 16-bit .png or 32-bit .tif
            settings=spatial, name=name,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        error = _error_message(image_path, exc)
        run_logger().warning(f"spatial report failed: {error}")
        return {"error": error}
    record_files(out_dir, paths.values())
    return {key: str(path) for key, path in paths.items()}


spatial_report_task = task(
    spatial_report, name="spatial-report", task_run_name="spatial-{name}", cache_policy=NO_CACHE, persist_result=False
)


def report_current(out_dir: Path, name: str, spatial: Any) -> bool:
    """Whether image ``name``'s spatial report exists as it was written, made with the settings ``spatial``."""
    from dataclasses import asdict

    from nucleiseg.spatial_report import report_paths

    paths = report_paths(out_dir, name)
    if not all(p.is_file() and is_owned(p) for p in paths.values()):
        return False
    try:
        return json.loads(paths["json"].read_text(encoding="utf-8")).get("settings") == asdict(spatial)
    except (OSError, ValueError, AttributeError):
        return False


def log_reports_to_mlflow(out_dir: Path, names: list[str]) -> int:
    """Log the spatial reports of images ``names`` to the active MLflow run, as artifacts under ``spatial/``;
    returns how many files were logged (0 without an active run)."""
    import sys

    from nucleiseg.spatial_report import report_paths

    mlflow = sys.modules.get("mlflow")  # not imported: no run can be active, and importing it takes seconds
    if mlflow is None or mlflow.active_run() is None:
        return 0
    logged = 0
    for name in names:
        for path in report_paths(out_dir, name).values():
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="spatial")
                logged += 1
    return logged


# --- the flow ---------------------------------------------------------------------------------------


def _task_model(mapper: Mapper, predictor: Predictor, resolved: ModelVersionInfo, device: str) -> Any:
    """What tasks get as the model: the shared predictor (threads), or where each Dask worker loads it from."""
    if mapper.shares_memory:
        return predictor
    import mlflow

    return ModelSource(
        resolved.load_ref, resolved.identity, device, mlflow.get_tracking_uri(), mlflow.get_registry_uri(),
        predictor.backend,
    )  # fmt: skip


def _error_message(path: str, exc: Any) -> str:
    """``Type: message`` naming the file (as :func:`nucleiseg.infer.predict_files` reports errors)."""
    message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    return f"{type(exc).__name__}: {message}"


def _settings(cls: type, defaults: Any, overrides: Mapping[str, Any] | None, section: str) -> Any:
    unknown = sorted(set(overrides or {}) - set(cls.__dataclass_fields__))
    if unknown:
        raise BatchInferenceError(f"{section}: unknown keys {unknown} (known: {sorted(cls.__dataclass_fields__)})")
    return cls(**{**defaults.__dict__, **(overrides or {})})


def _markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: counts, model, and one table row per image (the Prefect artifact)."""
    model = summary["model"]
    lines = [
        "# Batch inference",
        "",
        f"`{summary['input_dir']}` -> `{summary['out_dir']}` with `{model['uri']}` ({model['identity']})",
        "",
        f"**{summary['ok']} done, {summary['skipped']} skipped (up to date), {summary['failed']} failed** "
        f"of {summary['inputs']} images; {summary['nuclei']} nuclei; {summary['seconds']:.1f} s",
        "",
        "| image | status | nuclei | tumor | lymphocyte | stroma | seconds | detail |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        failed = r["status"] == "failed"
        counts = ["" if failed else r.get(k, "") for k in ("nuclei", "tumor", "lymphocyte", "stroma")]
        detail = r.get("error") if failed else r.get("reason", "")
        cells = [Path(r["input"]).name, r["status"], *counts, f"{r.get('seconds', 0):.2f}", detail or ""]
        lines.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


@flow(name="batch-inference")
def batch_inference(
    input_dir: str,
    out_dir: str,
    model_uri: str = DEFAULT_MODEL,
    infer: dict[str, Any] | None = None,
    post: dict[str, Any] | None = None,
    runner: Runner = "threads",
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    dask_address: str | None = None,
    names: list[str] | None = None,
    force: bool = False,
    slide: dict[str, Any] | None = None,
    slide_mpp: float | None = None,
    spatial: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The batch as a Prefect flow run (a Prefect API must be configured, or Prefect starts a temporary one):
    :func:`run_batch` with its mapped steps as task runs on a Prefect task runner. ``progress``: progress bars
    on stderr (:class:`pipelines.execution.ProgressBars`)."""
    try:
        mapper = PrefectMapper(runner, workers, dask_address, progress)
    except RunnerError as exc:
        raise BatchInferenceError(str(exc)) from None
    with mapper:
        return run_batch(
            mapper, input_dir, out_dir, model_uri, infer, post, device, names, force, slide, slide_mpp, spatial
        )


def run_batch_locally(
    input_dir: str,
    out_dir: str,
    model_uri: str = DEFAULT_MODEL,
    infer: dict[str, Any] | None = None,
    post: dict[str, Any] | None = None,
    runner: Runner = "threads",
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    dask_address: str | None = None,
    names: list[str] | None = None,
    force: bool = False,
    slide: dict[str, Any] | None = None,
    slide_mpp: float | None = None,
    spatial: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The batch without Prefect (no API, no server, nothing recorded in Prefect): :func:`run_batch` with its
    mapped steps as plain calls on threads or a Dask cluster (:class:`pipelines.execution.LocalMapper`).
    Same arguments and result as :func:`batch_inference`."""
    try:
        mapper = LocalMapper(runner, workers, dask_address, progress)
    except RunnerError as exc:
        raise BatchInferenceError(str(exc)) from None
    with mapper:
        return run_batch(
            mapper, input_dir, out_dir, model_uri, infer, post, device, names, force, slide, slide_mpp, spatial
        )


def batch(**arguments: Any) -> dict[str, Any]:
    """:func:`batch_inference` (a flow run) when a Prefect API is configured, else :func:`run_batch_locally`:
    never a temporary Prefect server (see :mod:`pipelines.execution`). ``arguments``: those of either."""
    if prefect_api_configured():
        try:
            check_prefect_api()
        except RunnerError as exc:
            raise BatchInferenceError(str(exc)) from None
        return batch_inference(**arguments)
    return run_batch_locally(**arguments)


def run_batch(
    mapper: Mapper,
    input_dir: str,
    out_dir: str,
    model_uri: str = DEFAULT_MODEL,
    infer: dict[str, Any] | None = None,
    post: dict[str, Any] | None = None,
    device: str = "auto",
    names: list[str] | None = None,
    force: bool = False,
    slide: dict[str, Any] | None = None,
    slide_mpp: float | None = None,
    spatial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Segment every image of ``input_dir`` into ``out_dir`` with ``model_uri``, skipping images already done.

    ``model_uri``: a checkpoint file, a local MLflow model folder, or an MLflow URI (``models:/name@alias``,
    ``models:/name/3``, ``runs:/<id>/model``), resolved against the current MLflow configuration.
    ``infer`` (``tile``, ``overlap``, ``batch_size``, ``tta``) and ``post`` (``min_area``, ``radius``) default
    to the model's own settings. ``mapper`` runs the mapped steps (images, slide chunks, spatial reports): in a
    Prefect flow run or without Prefect, on threads or Dask (:mod:`pipelines.execution`; module docstring).
    ``names``: only the images with these file stems (e.g. a split of a dataset folder); all when None.
    ``force``: replace existing outputs that nucleiseg did not write (see "Output safety").
    Slides in ``input_dir`` (``nucleiseg.wsi.is_slide``) go through :func:`pipelines.slide_inference.run_slides`
    with the ``slide`` settings (params section ``slide``) on the same kind of runner; ``slide_mpp`` is the
    microns per pixel of slides whose metadata has none; ``spatial`` sets their spatial reports.

    Returns the summary also written to ``out_dir/batch_summary.json``: ``model`` (uri, identity, version,
    run id, created), ``settings``, counts (``inputs``, ``ok``, ``skipped``, ``failed``, ``nuclei``) and
    ``results``, one per image (:class:`nucleiseg.infer.FileResult` fields, status ``ok`` / ``skipped`` /
    ``failed``, ``reason``: why it was computed or skipped, ``error``: why it failed). Raises
    :class:`ModelLoadError` for an unusable model and :class:`BatchInferenceError` for unusable folders or
    runner, before any image is processed.
    """
    logger = run_logger()
    started = time.perf_counter()
    source_dir, out = Path(input_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise BatchInferenceError(f"{source_dir}: input folder not found")
    try:
        # Apart from the input: outputs (NAME_overlay.png, ...) in it would be read as new images next time.
        folder = OutputFolder(out, [source_dir], force)
    except OutputError as exc:
        raise BatchInferenceError(str(exc)) from None

    resolved = resolve_model(model_uri)
    infer = dict(infer or {})
    backend = infer.pop("backend", "torch")  # how the network runs (load_predictor), not a tiling setting
    predictor = load_predictor(resolved.load_ref, device, backend=backend)
    logger.info(f"model {model_uri} -> {resolved.identity} on {predictor.device}")
    if predictor.device.startswith("cuda"):
        # Concurrent images would each switch the shared model's memory format; do it once for all of them.
        import torch

        predictor.model.to(memory_format=torch.channels_last)
    infer_s = _settings(InferSettings, predictor.infer, infer, "infer")
    post_s = _settings(PostSettings, predictor.post, post, "post")
    settings = {"infer": dict(infer_s.__dict__), "post": dict(post_s.__dict__)}
    if predictor.backend != "torch":  # outputs of another backend are not reused (torch runs keep their settings)
        settings["infer"]["backend"] = predictor.backend

    files, problems = expand_inputs([source_dir])
    from nucleiseg.spatial import settings_from as spatial_settings
    from nucleiseg.spatial_report import report_paths
    from nucleiseg.streaming import SlideSettings, slide_name, slide_output_paths
    from pipelines.slide_inference import run_slides, split_slides

    files, slides, problems = split_slides(files, problems, source_dir)
    if names is not None:
        wanted = set(names)
        files = [f for f in files if f.stem in wanted]
        slides = [s for s in slides if slide_name(s) in wanted]
        missing = sorted(wanted - {f.stem for f in files} - {slide_name(s) for s in slides})
        if missing:
            raise BatchInferenceError(f"{source_dir}: no image for {', '.join(missing)}")
    planned = plan_images(files, out, resolved, settings, read_previous_summary(out))
    todo = [p for p in planned if p.entry is None]
    try:
        folder.claim([*(q.name for p in todo for q in output_files(out, p.name)), SUMMARY_NAME,
                      *(q.name for p in planned for q in report_paths(out, p.name).values()),
                      *(q.name for s in slides for q in slide_output_paths(out, slide_name(s)).values())])  # fmt: skip
    except OutputError as exc:
        raise BatchInferenceError(str(exc)) from None
    logger.info(f"{len(planned)} images: {len(todo)} to predict, {len(planned) - len(todo)} skipped or clashing")

    slide_entries = [{"input": str(s), "name": slide_name(s), "kind": "slide", "status": "pending"} for s in slides]

    def write_summary() -> dict[str, Any]:
        results = (
            [p.as_dict() for p in problems]
            + [
                {
                    **(p.entry or {"input": str(p.path), "name": p.name, "status": "pending", "reason": p.reason}),
                    "input_sha256": p.sha256,
                }
                for p in planned
            ]
            + slide_entries
        )
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "failed")}
        summary = {
            "flow": "batch-inference",
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
            "orchestrated": mapper.orchestrated,
            "input_dir": str(source_dir),
            "out_dir": str(out),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": resolved.as_dict(),
            "device": predictor.device,
            "settings": settings,
            "runner": mapper.runner,
            "workers": mapper.workers,
            "seconds": round(time.perf_counter() - started, 3),
            "inputs": len(results),
            **counts,
            "nuclei": sum(int(r.get("nuclei") or 0) for r in results if r["status"] in _REUSABLE),
            "results": results,
        }
        write_json_atomic(out / SUMMARY_NAME, summary)
        folder.record([out / SUMMARY_NAME])
        return summary

    if todo:
        # Recorded before any output is rewritten: if this run is interrupted, the images it was working on
        # are "pending" (never reused) under this model, instead of looking up to date under the previous one.
        write_summary()
        outcomes = mapper.map(
            predict_image_task,
            {"path": [str(p.path) for p in todo], "name": [p.name for p in todo]},
            {"out_dir": str(out), "model": _task_model(mapper, predictor, resolved, device), "infer": infer_s,
             "post": post_s},
            label="images",
        )  # fmt: skip
        for item, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, dict):
                item.entry = {**outcome, "reason": item.reason}
            else:  # a bug (see "Failures"): the task's exception, returned rather than raised
                error = _error_message(str(item.path), outcome)
                logger.warning(f"failed: {error}")
                failed = FileResult(str(item.path), item.name, "failed", error).as_dict()
                item.entry = {**failed, "reason": item.reason}

    spatial_s = spatial_settings(spatial or {})
    done = [p for p in planned if p.entry is not None and p.entry.get("status") in _REUSABLE]
    stale = [p for p in done if p.entry["status"] == "ok" or not report_current(out, p.name, spatial_s)]
    reports = mapper.map(
        spatial_report_task,
        {"image_path": [str(p.path) for p in stale], "name": [p.name for p in stale]},
        {"out_dir": str(out), "spatial": spatial_s, "default_mpp": predictor.mpp},
        label="spatial reports",
        where="threads",  # small and local: files in, files out, no network
    )
    for item, report in zip(stale, reports, strict=True):
        item.entry["spatial_report"] = report if isinstance(report, dict) else {"error": str(report)}
    logged = log_reports_to_mlflow(out, [p.name for p in done])
    if logged:
        logger.info(f"{logged} spatial report files logged to the active MLflow run (artifacts: spatial/)")

    if slides:
        write_summary()
        slide_entries[:] = run_slides(
            mapper, slides, out, _task_model(mapper, predictor, resolved, device), predictor,
            resolved.as_dict(), infer_s, post_s, SlideSettings.from_mapping(slide or {}), slide_mpp, folder.record,
            spatial_settings(spatial or {}),
        )  # fmt: skip
    summary = write_summary()
    if mapper.orchestrated:  # an artifact needs a flow run (and its API)
        create_markdown_artifact(
            key=ARTIFACT_KEY, markdown=summary_markdown(summary), description=f"Batch inference of {source_dir}"
        )
    logger.info(f"{summary['ok']} done, {summary['skipped']} skipped, {summary['failed']} failed; {out / SUMMARY_NAME}")
    return summary


def flow_arguments(
    params: Params,
    input_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model_uri: str | None = None,
    tta: bool | None = None,
    runner: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    names: list[str] | None = None,
    force: bool = False,
    slide_mpp: float | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :func:`batch_inference` given by the settings (``infer``, ``post``, ``slide``,
    ``promote.model_name``) and the command-line choices (plain values, as Prefect records them)."""
    infer = params.infer.model_dump()
    runner = runner or params.infer.runner
    workers = workers or params.infer.workers
    infer = {k: v for k, v in infer.items() if k in InferSettings.__dataclass_fields__ or k == "backend"}
    if tta is not None:
        infer["tta"] = tta
    return {
        "input_dir": str(input_dir),
        "out_dir": str(out_dir),
        "model_uri": model_uri or f"models:/{params.promote.model_name}@champion",
        "infer": infer,
        "post": params.post.model_dump(),
        "runner": runner,
        "workers": int(workers),
        "device": device,
        "names": names,
        "force": force,
        "dask_address": params.infer.dask_address,
        "slide": params.slide.model_dump(),
        "slide_mpp": slide_mpp,
        "spatial": params.spatial.model_dump(),
    }


__all__ = [
    "ARTIFACT_KEY",
    "DEFAULT_MODEL",
    "RUNNERS",
    "SUMMARY_NAME",
    "BatchInferenceError",
    "ModelSource",
    "ModelVersionInfo",
    "PlannedImage",
    "batch",
    "batch_inference",
    "flow_arguments",
    "log_reports_to_mlflow",
    "plan_images",
    "predict_image",
    "predict_image_task",
    "read_previous_summary",
    "report_current",
    "resolve_model",
    "run_batch",
    "run_batch_locally",
    "spatial_report",
    "spatial_report_task",
    "summary_markdown",
    "up_to_date",
    "worker_predictor",
]
