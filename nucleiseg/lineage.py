"""What a training run records in MLflow beyond its curves: the data it came from and the test figures after it.

Definitions:

- **metric names** are grouped by ``/``, as the MLflow UI groups them into sections: ``train/loss``, ``train/ce``,
  ``train/perceptual``, ``train/lr``, ``train/epoch_seconds``, ``val/f1``, ``val/dice``, ... per epoch, and after
  the test split is scored ``test/all/f1``, ``test/tumor/pq``, ``test/classification/accuracy``, ``test/mpq_plus``,
  ``test/hovernet/pq``, ``test/hovernet/f1_d``, ... (the headline of :func:`nucleiseg.evaluation.headline`, its
  nesting joined by ``/``). ``history.json`` keeps its flat keys (``train_loss``, ``val_f1``: DVC plots and Optuna
  read them); :func:`metric_name` maps one to the other. An undefined figure (JSON ``null``, e.g. the Hausdorff
  distance of an image set with no match) is not logged: MLflow's logged-model table would store NaN as 0.
- **the data version** (:func:`dvc_md5`): the md5 DVC records for the dataset folder, from ``dvc.lock`` (an output
  or dependency of a stage) or ``<folder>.dvc``; None when DVC does not track the folder.
- **a split dataset** (:class:`SplitDataset`): the images of one split of ``splits.json`` as an MLflow dataset,
  logged with the context ``training``, ``validation`` or ``test``. Its name is ``<folder>/<split>``, its digest
  ``<8 hex of the data version>-<8 hex of the sha256 of the split's sorted image names>`` (the data version is the
  DVC md5, or :func:`nucleiseg.tracking.dataset_hash` when DVC has none), so the same folder split differently
  is another dataset. Its source (type ``dvc``) holds the folder, the full DVC md5 and the file that records it,
  and the content hash; its profile the number and names of the images.

Everything here writes through :class:`mlflow.MlflowClient` to a run given by id (no active-run state), so a
later command (``nucleiseg score``, ``nucleiseg report``) can add to the training run it scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource

#: The splits of ``splits.json`` and the MLflow input context each is logged with.
CONTEXTS: dict[str, str] = {"train": "training", "val": "validation", "test": "test"}
#: Per-epoch history keys whose group is not their prefix: the learning rate and the epoch's time are training's.
_TRAIN_GROUP = frozenset({"lr", "epoch_seconds"})
#: The run tag that ties a training run to the bytes of the checkpoint it logged as its model.
CHECKPOINT_TAG = "checkpoint.sha256"
# Files ``nucleiseg train`` writes beside its checkpoints (nucleiseg.train).
RUN_ID_FILE = "mlflow_run_id"
MODEL_URI_FILE = "model_uri"


# ----------------------------------------------------------------------------------------------------
# Metric names


def metric_name(key: str) -> str:
    """The MLflow name of a ``history.json`` key: ``train_loss`` -> ``train/loss``, ``val_f1`` -> ``val/f1``,
    ``lr`` -> ``train/lr``; a name that already has a group is kept."""
    if "/" in key:
        return key
    if key in _TRAIN_GROUP:
        return f"train/{key}"
    group, sep, rest = key.partition("_")
    if sep and group in ("train", "val", "test"):
        return f"{group}/{rest}"
    return key


def figure_metrics(figures: Mapping[str, Any], prefix: str = "test") -> dict[str, float]:
    """Nested figures as metrics: ``{"all": {"f1": 0.8}, "hovernet": {"pq": 0.4}}`` ->
    ``{"test/all/f1": 0.8, "test/hovernet/pq": 0.4}``. Numbers only (lists such as the confusion matrix and
    text are left out); undefined figures (``None``, NaN) are left out (see the module docstring)."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(figure_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------
# Datasets


def _dvc_outs(document: Any) -> list[Mapping[str, Any]]:
    """Every ``{path, md5}`` entry of a dvc.lock or .dvc document (stage outputs and dependencies, top-level outs)."""
    entries: list[Mapping[str, Any]] = []
    if not isinstance(document, Mapping):
        return entries
    entries += [e for e in document.get("outs", []) or [] if isinstance(e, Mapping)]
    for stage in (document.get("stages") or {}).values():
        if isinstance(stage, Mapping):
            for key in ("outs", "deps"):
                entries += [e for e in stage.get(key, []) or [] if isinstance(e, Mapping)]
    return entries


def dvc_md5(folder: str | os.PathLike[str], repo: str | os.PathLike[str] = ".") -> tuple[str, str] | None:
    """``(md5, file)``: the md5 DVC records for ``folder`` (``<32 hex>.dir`` for a folder) and the file that records
    it (``dvc.lock`` first, then ``<folder>.dvc``), or None when DVC does not track it. ``folder`` is taken
    relative to ``repo`` (the DVC project's root) unless absolute."""
    import yaml

    repo = Path(repo).resolve()
    target = (repo / folder).resolve()
    for record in (repo / "dvc.lock", target.with_name(target.name + ".dvc")):
        if not record.is_file():
            continue
        try:
            document = yaml.safe_load(record.read_text())
        except (OSError, yaml.YAMLError):
            continue  # an unreadable record is no record; the content hash stands in
        for entry in _dvc_outs(document):
            path, md5 = entry.get("path"), entry.get("md5")
            if isinstance(path, str) and isinstance(md5, str) and (record.parent / path).resolve() == target:
                return md5, record.relative_to(repo).as_posix() if record.is_relative_to(repo) else str(record)
    return None


class DVCDatasetSource(DatasetSource):
    """Where a split's images come from: a folder versioned by DVC (``dvc pull`` brings back its ``md5``)."""

    def __init__(self, path: str, md5: str | None, record: str | None, content_hash: str) -> None:
        self.path, self.md5, self.record, self.content_hash = path, md5, record, content_hash

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, dst_path: str | None = None) -> str:
        """The folder's path (``dvc pull`` or ``dvc checkout`` restores the version of :attr:`md5`)."""
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # made explicitly by split_datasets, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> DVCDatasetSource:
        raise NotImplementedError("a DVC dataset source is made by nucleiseg.lineage.split_datasets")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "dvc_md5": self.md5, "dvc_file": self.record, "content_hash": self.content_hash}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DVCDatasetSource:
        return cls(source_dict["path"], source_dict.get("dvc_md5"), source_dict.get("dvc_file"),
                   source_dict["content_hash"])  # fmt: skip


class SplitDataset(Dataset):
    """The images of one split as an MLflow dataset (see the module docstring for its name and digest)."""

    def __init__(self, source: DVCDatasetSource, split: str, images: Sequence[str]) -> None:
        self.split = split
        self.images = sorted(images)
        super().__init__(source=source, name=f"{Path(source.path).name}/{split}")

    def _compute_digest(self) -> str:
        source: DVCDatasetSource = self.source  # type: ignore[assignment]
        version = (source.md5 or source.content_hash).removesuffix(".dir")
        names = hashlib.sha256("\n".join(self.images).encode()).hexdigest()
        return f"{version[:8]}-{names[:8]}"

    @property
    def profile(self) -> dict[str, Any]:
        return {"images": len(self.images), "names": self.images}

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def split_datasets(
    data_dir: str | os.PathLike[str], splits: Mapping[str, Sequence[str]], repo: str | os.PathLike[str] = "."
) -> dict[str, SplitDataset]:
    """One :class:`SplitDataset` per non-empty split of ``splits`` (``{"train": [...], "val": [...], ...}``), keyed
    by split, for the annotated folder ``data_dir`` of the DVC project at ``repo``."""
    from nucleiseg.tracking import dataset_hash

    recorded = dvc_md5(data_dir, repo)
    md5, record = recorded if recorded is not None else (None, None)
    source = DVCDatasetSource(Path(data_dir).as_posix(), md5, record, dataset_hash(data_dir))
    return {split: SplitDataset(source, split, splits[split]) for split in CONTEXTS if splits.get(split)}


def log_datasets(run_id: str, datasets: Mapping[str, SplitDataset]) -> None:
    """Log each split dataset as an input of the run, with its context (``training``, ``validation``, ``test``)."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])])
        for split, dataset in datasets.items()
    ]
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)


# ----------------------------------------------------------------------------------------------------
# Results after training


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint file's bytes (what :data:`CHECKPOINT_TAG` records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_run_of(checkpoint: str | os.PathLike[str]) -> tuple[str, str | None] | str:
    """``(run id, logged model id or None)`` of the training run that logged ``checkpoint`` as its model, from the
    files ``nucleiseg train`` wrote beside it, checked against the run's :data:`CHECKPOINT_TAG`; otherwise a
    sentence saying why there is none (no run id file, no such run in the store, another checkpoint)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    checkpoint = Path(checkpoint)
    run_file, uri_file = checkpoint.with_name(RUN_ID_FILE), checkpoint.with_name(MODEL_URI_FILE)
    if not checkpoint.is_file() or not run_file.is_file():
        return f"no {run_file} beside the checkpoint (trained without tracking?)"
    run_id = run_file.read_text().strip()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return f"run {run_id} of {run_file} is not in the tracking store {mlflow.get_tracking_uri()}"
    recorded = run.data.tags.get(CHECKPOINT_TAG)
    if recorded is None:
        return f"run {run_id} recorded no {CHECKPOINT_TAG}: it cannot be told whether {checkpoint} is its model"
    if recorded != checkpoint_digest(checkpoint):
        return f"{checkpoint} is not the checkpoint run {run_id} logged (its {CHECKPOINT_TAG} differs)"
    uri = uri_file.read_text().strip() if uri_file.is_file() else ""
    model_id = uri.removeprefix("models:/") if uri.startswith("models:/m-") else None
    return run_id, model_id


def log_figures(
    run_id: str,
    figures: Mapping[str, Any],
    *,
    prefix: str = "test",
    step: int = 0,
    model_id: str | None = None,
    dataset: SplitDataset | None = None,
) -> dict[str, float]:
    """Log nested ``figures`` (:func:`figure_metrics`) at ``step`` on the run and, with ``model_id``, on its logged
    model, measured on ``dataset`` (which MLflow then lists among the run's and the model's datasets). Returns
    them."""
    import mlflow

    metrics = figure_metrics(figures, prefix)
    if metrics:
        mlflow.log_metrics(metrics, step=step, run_id=run_id, model_id=model_id, dataset=dataset, synchronous=True)
    return metrics


def record_test_results(
    checkpoint: str | os.PathLike[str],
    figures: Mapping[str, Any],
    confusion: tuple[Any, Sequence[str]] | None = None,
    files: Sequence[str | os.PathLike[str]] = (),
    dataset: SplitDataset | None = None,
) -> str:
    """Give the training run of ``checkpoint`` (:func:`training_run_of`) and its logged model the test ``figures``
    (``test/...``, on ``dataset``), the ``confusion`` matrix ``(counts, class names)`` drawn as
    ``evaluation/confusion.png`` and ``files`` under ``evaluation/``. Returns a line saying what was logged where,
    or why nothing was (a checkpoint that no run in the store logged is not an error: it has no run to add to)."""
    import tempfile

    from nucleiseg.plots import confusion_png

    found = training_run_of(checkpoint)
    if isinstance(found, str):
        return f"test figures not logged to MLflow: {found}"
    run_id, model_id = found
    metrics = log_figures(run_id, figures, prefix="test", model_id=model_id, dataset=dataset)
    with tempfile.TemporaryDirectory() as tmp:
        drawn = []
        if confusion is not None:
            drawn.append(Path(tmp) / "confusion.png")
            confusion_png(confusion[0], confusion[1], drawn[0], title="Test split: classes of the detected nuclei")
        log_artifacts(run_id, [*drawn, *files], "evaluation")
    on_model = f" and its logged model {model_id}" if model_id else ""
    return f"{len(metrics)} test figures (test/...) logged to MLflow run {run_id}{on_model}"


def log_artifacts(run_id: str, paths: Sequence[str | os.PathLike[str]], artifact_path: str | None = None) -> None:
    """Add files to the run's artifacts (under ``artifact_path``); a missing file is skipped."""
    import mlflow

    client = mlflow.MlflowClient()
    for path in paths:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)


__all__ = [
    "CHECKPOINT_TAG",
    "CONTEXTS",
    "DVCDatasetSource",
    "SplitDataset",
    "checkpoint_digest",
    "dvc_md5",
    "figure_metrics",
    "log_artifacts",
    "log_datasets",
    "log_figures",
    "metric_name",
    "record_test_results",
    "split_datasets",
    "training_run_of",
]
