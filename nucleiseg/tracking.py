"""Experiment tracking with MLflow: the local store, run provenance, and model logging.

The default store is SQLite under ``mlruns/`` (``sqlite:///mlruns/mlflow.db``) with artifacts in
``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` in the environment overrides the URI from params. Every
run records where it came from: the git commit, the dataset's content hash and the params hash as tags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ARTIFACT = "model"
# The experiment tag MLflow 3 reads to choose the experiment page's kind: classic model training (runs, metrics,
# models), not the GenAI page (traces, evaluations). MLflow 3.17's UI follows its global "GenAI / Model training"
# switch instead: a link with ``?workflowType=machine_learning`` opens in model training (`make ui` prints one), and
# the browser remembers the switch once it is clicked.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(configured: str) -> str:
    """The tracking URI in force: ``MLFLOW_TRACKING_URI`` when set, else the configured one."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


class StoreNotFoundError(RuntimeError):
    """No MLflow store to read a model from; the message names what to set."""


def existing_store_uri(configured: str | None) -> str:
    """The MLflow store to load a registered or logged model from, checked to exist (reading never creates one).

    ``MLFLOW_TRACKING_URI`` when set, else ``configured`` (the project's ``tracking.uri``; None outside a
    project). Raises :class:`StoreNotFoundError` when there is neither, or when a local store (SQLite file, or a
    ``file:`` / plain folder) does not exist: MLflow would silently create an empty one, such as
    ``./mlruns/mlflow.db`` in whatever folder the command was run from, and then report the model missing.
    """
    uri = tracking_uri(configured or "")
    if not uri:
        raise StoreNotFoundError(
            "an MLflow model URI (models:/, runs:/) needs a tracking store: set MLFLOW_TRACKING_URI (e.g. "
            "sqlite:////path/to/project/mlruns/mlflow.db), or run from the project folder or give --params"
        )
    if uri.startswith("sqlite:///"):
        local: Path | None = Path(uri.removeprefix("sqlite:///"))
    elif uri.startswith("file:") or "://" not in uri:
        local = Path(uri.removeprefix("file://").removeprefix("file:"))
    else:
        local = None  # a server (http, databricks, ...): it answers for itself
    if local is not None and not local.exists():
        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
        raise StoreNotFoundError(
            f"{local.resolve()}: no MLflow store there ({source} = {uri}); train and register a model first, "
            "or set MLFLOW_TRACKING_URI to the store that holds the model"
        )
    return uri


_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def use_store(tracking: str, registry: str | None = None) -> None:
    """Point this process's MLflow at a tracking store (and registry: ``registry``, else unchanged), leaving the
    environment as it was.

    ``mlflow.set_tracking_uri`` and ``set_registry_uri`` also export ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI``. Every child process would inherit them as if the user had set them: ``dvc repro``
    started by the retraining flow, or a stage started by a process that had opened another store, would then read
    and write that store instead of its project's. MLflow keeps the URIs in the process as well, so the exported
    variables are put back to what they were.
    """
    import mlflow

    saved = {name: os.environ.get(name) for name in _URI_VARIABLES}
    try:
        mlflow.set_tracking_uri(tracking)
        if registry is not None:
            mlflow.set_registry_uri(registry)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure(uri: str, experiment: str, artifacts: str | os.PathLike[str] | None = None) -> str:
    """Point MLflow at the store and select (creating if needed) the experiment; return its id.

    For a local SQLite store the parent folder is created, and the experiment's artifacts go to
    ``artifacts`` (an absolute file URI, so runs started from any working directory agree).
    """
    import mlflow

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # A local SQLite store holds the model registry too: one file for runs, models and aliases.
    use_store(uri, uri if uri.startswith("sqlite:///") else None)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag was set, or by another tool
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    location = Path(artifacts).resolve().as_uri() if artifacts is not None else None
    experiment_id = mlflow.create_experiment(
        experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(path: str | os.PathLike[str] = ".") -> str | None:
    """The commit checked out at ``path`` (with ``-dirty`` when the tree has changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def dataset_hash(folder: str | os.PathLike[str], suffixes: Iterable[str] = (".png", ".tif", ".tiff")) -> str:
    """Content hash of a dataset folder: file names and bytes, in sorted order (16 hex digits).

    The same files give the same hash wherever the folder lives; any added, removed, renamed or edited
    image or annotation changes it. Used to tell whether a model was trained on the current data.
    """
    folder = Path(folder)
    suffixes = tuple(suffixes)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def log_params(flat: Mapping[str, Any]) -> None:
    """Log flattened settings; values are stringified (lists, None) as MLflow stores text."""
    import mlflow

    mlflow.log_params({k: ("null" if v is None else v) for k, v in flat.items()})


def log_pytorch_model(
    model: Any,
    example: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
    name: str = MODEL_ARTIFACT,
) -> Any:
    """Log ``model`` with a signature inferred from ``example`` (N, 3, H, W float32); return ModelInfo.

    ``metadata`` (normalisation statistics, stain normaliser, inference settings, model factory
    arguments) is stored in the MLmodel file so that a registered model carries everything
    :func:`nucleiseg.infer.load_predictor` needs.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(torch.from_numpy(example).to(device)).float().cpu().numpy()
    model.train(was_training)
    signature = infer_signature(example, output)
    return mlflow.pytorch.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        metadata=dict(metadata or {}),
        # MLflow 3 defaults to torch.export ("pt2"), which fixes the graph to the example's shape;
        # tiled inference needs any batch and tile size, so keep the plain module.
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm", "numpy"],
    )
