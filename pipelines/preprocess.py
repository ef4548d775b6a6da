"""The validated preprocessing flow: dataset folder -> versioned training inputs (Prefect 3).

``preprocess`` runs these tasks, each a function of :mod:`nucleiseg`::

    digest -> manifest -> validate (Great Expectations) -> split -> fit stain normaliser
           -> prepare images (stain-normalise, copy labels, cut training patches; one task per image)
           -> channel statistics -> publish

The split comes before the stain fit because the default stain reference is the first *training* image.
A dataset that fails validation stops the flow before anything is written: the error (a
:class:`nucleiseg.validation.DatasetValidationError`) lists the failed expectations and the offending files,
and the report is also recorded as a Prefect Markdown artifact (key ``dataset-validation``).

Output layout (``out_dir``)::

    splits.json                         {"train": [names], "val": [...], "test": [...]}
    stain.json                          the fitted stain normaliser (nucleiseg.stain.load_normalizer)
    stats.json                          RGB mean and std of the normalised training images, [0, 1] units
    manifest.csv                        the validated per-image manifest, with a "split" column
    prepare.json                        provenance: source folder and its content hash, settings, counts
    validation/                         GX validation result, report.json, data docs (validation/data_docs/index.html)
    images/<split>/<name>.png           the stain-normalised tile of every split (for tiled validation/inference)
    images/<split>/<name>_label.png     its label (16-bit PNG), and <name>_other.png when there is an ignore map
    patches/train/<name>_p<k>.png       grid patches of the normalised training tiles,
    patches/train/<name>_p<k>_label.png   with their labels (and _other.png ignore maps)

Atomic outputs: everything is written into a fresh folder beside ``out_dir`` and swapped in only when every
task has succeeded; a failed or interrupted run leaves the previous ``out_dir`` exactly as it was. The new
folder carries the record of :mod:`nucleiseg.outputs` (``.nucleiseg-outputs.json``), by which ``nucleiseg
prepare`` knows it may replace it next time; the command checks that ``out_dir`` may be replaced first.

Caching: the manifest (decoding every file) and the stain fit are cached on the *content* of their inputs
(the SHA-256 of the dataset files, or of the reference tile) plus the source of the code that computes them,
so a rerun on unchanged data skips them and any change to a file or to that code recomputes. Tasks whose
product is files in this run's staging folder are not cached (their results would point into a folder that
no longer exists); skipping the whole stage when nothing changed is DVC's job.

Retries: only for the per-image file writes, and only on transient I/O errors (``OSError`` other than a
missing file or a permission problem), e.g. a network filesystem hiccup; the writes are idempotent. Nothing
else retries: decoding, validation, fitting and statistics are deterministic, so a retry would fail the same
way and only delay the error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

import nucleiseg.io
import nucleiseg.stain
import nucleiseg.validation
from nucleiseg.io import IMAGE_SUFFIXES, read_image, write_image, write_json_atomic, write_text_atomic
from nucleiseg.labels import CLASS_NAMES, read_label, write_label
from nucleiseg.outputs import replaced_folder
from nucleiseg.params import ChecksParams, Params
from nucleiseg.prepare import SPLITS, channel_stats, split_dataset, write_patches, write_splits, write_stats
from nucleiseg.stain import StainNormalizer, fit_normalizer
from nucleiseg.validation import DatasetValidationError, ValidationReport, build_manifest, validate_manifest


class PreprocessError(RuntimeError):
    """Some images could not be prepared; the message names each and why. Nothing was published."""


# --- helpers ----------------------------------------------------------------------------------------


def dataset_digest(data_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of a dataset folder's image files (names and bytes, in name order)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def _source_digest(*modules: Any) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _cache_key(*parts: Any, modules: tuple[Any, ...]) -> str:
    blob = json.dumps([str(p) for p in parts]) + _source_digest(*modules)
    return hashlib.sha256(blob.encode()).hexdigest()


def _manifest_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return _cache_key(
        "manifest",
        Path(parameters["data_dir"]).resolve(),
        parameters["data_sha256"],
        parameters["ignore_suffix"],
        modules=(nucleiseg.validation, nucleiseg.io),
    )


def _stain_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return _cache_key(
        "stain", parameters["reference_sha256"], parameters["method"], modules=(nucleiseg.stain, nucleiseg.io)
    )


def _transient_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only on I/O errors that may pass (not a missing file, not a permission or decoding problem)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError))


def _file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --- tasks ------------------------------------------------------------------------------------------


@task(name="digest", cache_policy=NO_CACHE)
def digest_task(data_dir: str) -> str:
    """Content hash of the dataset folder: the cache key of everything computed from it."""
    return dataset_digest(data_dir)


@task(name="manifest", cache_key_fn=_manifest_key, persist_result=True)
def manifest_task(data_dir: str, data_sha256: str, ignore_suffix: str) -> pd.DataFrame:
    """Decode every tile, label and ignore map into the per-image manifest (cached on the data hash)."""
    return build_manifest(data_dir, ignore_suffix)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(manifest: pd.DataFrame, checks: dict[str, Any], out_dir: str, dataset: str) -> ValidationReport:
    """Run the Great Expectations suite; raise :class:`DatasetValidationError` when the dataset is invalid."""
    logger = get_run_logger()
    report = validate_manifest(manifest, ChecksParams(**checks), out_dir, dataset=dataset)
    create_markdown_artifact(
        key="dataset-validation", markdown=report.to_markdown(), description=f"Dataset validation of {dataset}"
    )
    for warning in report.warnings:
        logger.warning(warning.line())
    if not report.success:
        raise DatasetValidationError(report)
    logger.info(report.summary())
    return report


@task(name="split", cache_policy=NO_CACHE)
def split_task(
    names: list[str],
    fractions: tuple[float, float, float],
    seed: int,
    explicit: dict[str, list[str]] | None,
    class_counts: dict[str, list[int]] | None,
) -> dict[str, list[str]]:
    """Split the tiles by image into train / val / test (cheap and deterministic: not cached)."""
    return split_dataset(names, fractions, seed, explicit=explicit, class_counts=class_counts)


@task(name="fit-stain", cache_key_fn=_stain_key, persist_result=True)
def fit_stain_task(reference_path: str, reference_sha256: str, method: str) -> dict[str, Any]:
    """Fit the stain normaliser on the reference tile; returns its JSON form (cached on the tile's hash)."""
    return fit_normalizer(read_image(reference_path), method).to_dict()


@task(
    name="prepare-image",
    task_run_name="prepare-{name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=_transient_io_error,
)
def prepare_image_task(
    name: str,
    row: dict[str, Any],
    split: str,
    stain: dict[str, Any],
    work_dir: str,
    patch_size: int,
    patch_grid: int,
) -> dict[str, Any]:
    """Stain-normalise one tile, write it with its label (and ignore map), and cut patches of a training tile."""
    source = Path(row["path"])
    normalised = StainNormalizer.from_dict(stain).transform(read_image(source))
    label = read_label(source.with_name(row["label_file"]))
    other = read_label(source.with_name(row["other_file"])) if row["other_file"] else None
    folder = Path(work_dir) / "images" / split
    write_image(folder / f"{name}.png", normalised)
    write_label(folder / f"{name}_label.png", label)
    if other is not None:
        write_label(folder / f"{name}_other.png", other)
    n_patches = 0
    if split == "train":
        patches = Path(work_dir) / "patches" / "train"
        n_patches = len(write_patches(normalised, label, other, patches, name, patch_size, patch_grid))
    return {"name": name, "split": split, "patches": n_patches}


@task(name="channel-stats", cache_policy=NO_CACHE)
def stats_task(work_dir: str, train: list[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the normalised training tiles, streamed from disk one tile at a time."""
    folder = Path(work_dir) / "images" / "train"
    mean, std = channel_stats(read_image(folder / f"{name}.png") for name in train)
    return [float(m) for m in mean], [float(s) for s in std]


# --- flow -------------------------------------------------------------------------------------------


def _reference(manifest: pd.DataFrame, reference: str | None, train: list[str]) -> pd.Series:
    """The manifest row of the stain reference: ``reference`` (name or file name) or the first training tile."""
    if reference is None:
        return manifest.set_index("name").loc[train[0]].rename(train[0])
    hits = manifest[(manifest["name"] == reference) | (manifest["file"] == reference)]
    if hits.empty:
        raise ValueError(f"stain.reference {reference!r} is not an image of the dataset")
    row = hits.iloc[0]
    return row.drop("name").rename(row["name"])


@flow(name="preprocess", task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1))
def preprocess(
    data_dir: str,
    out_dir: str,
    ignore_suffix: str = "_other",
    stain_method: str = "none",
    stain_reference: str | None = None,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    split_seed: int = 0,
    split_explicit: dict[str, list[str]] | None = None,
    stratify: bool = True,
    patch_size: int = 250,
    patch_grid: int = 4,
    checks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate ``data_dir`` and write the training inputs to ``out_dir`` (layout in the module docstring).

    Returns the provenance written to ``out_dir/prepare.json``. Raises
    :class:`~nucleiseg.validation.DatasetValidationError` for an invalid dataset and :class:`PreprocessError`
    when images fail to process; in both cases ``out_dir`` is left untouched.
    """
    logger = get_run_logger()
    checks = ChecksParams(**(checks or {})).model_dump()
    out = Path(out_dir)
    data_sha256 = digest_task(data_dir)
    manifest = manifest_task(data_dir, data_sha256, ignore_suffix)
    with replaced_folder(out, "prepare") as work:
        validate_task(manifest, checks, str(work / "validation"), data_dir)
        names = manifest["name"].tolist()
        class_counts = None
        if stratify:
            counts = manifest[[f"n_{c}" for c in CLASS_NAMES]].to_numpy()
            class_counts = {n: [int(k) for k in row] for n, row in zip(names, counts, strict=True)}
        splits = split_task(names, split_fractions, split_seed, split_explicit, class_counts)
        write_splits(work / "splits.json", splits)

        reference = _reference(manifest, stain_reference, splits["train"])
        stain = fit_stain_task(reference["path"], _file_sha256(reference["path"]), stain_method)
        StainNormalizer.from_dict(stain).save(work / "stain.json")

        split_of = {name: split for split in SPLITS for name in splits[split]}
        rows = manifest.set_index("name")
        members = [n for n in names if n in split_of]
        futures = prepare_image_task.map(
            members,
            [rows.loc[n].to_dict() for n in members],
            [split_of[n] for n in members],
            unmapped(stain),
            unmapped(str(work)),
            patch_size,
            patch_grid,
        )
        wait(futures)
        failed = []
        for name, future in zip(members, futures, strict=True):
            if not future.state.is_completed():
                failed.append(f"{name}: {future.result(raise_on_failure=False)}")
        if failed:
            raise PreprocessError(f"{len(failed)} of {len(members)} image(s) failed:\n  " + "\n  ".join(failed))
        prepared = [f.result() for f in futures]

        mean, std = stats_task(str(work), splits["train"])
        write_stats(work / "stats.json", mean, std)
        table = manifest.assign(split=manifest["name"].map(split_of).fillna(""))
        write_text_atomic(work / "manifest.csv", table.to_csv(index=False))
        summary = {
            "data_dir": str(data_dir),
            "data_sha256": data_sha256,
            "images": {s: len(splits[s]) for s in SPLITS},
            "patches": sum(p["patches"] for p in prepared),
            "stain": {"method": stain_method, "reference": reference.name},
            "split": {
                "fractions": list(split_fractions),
                "seed": split_seed,
                "explicit": split_explicit is not None,
                "stratify": stratify,
            },
            "patch": {"size": patch_size, "grid": patch_grid},
            "checks": checks,
            "mean": mean,
            "std": std,
        }
        write_json_atomic(work / "prepare.json", summary)
    logger.info(
        f"prepared {out}: {summary['images']} images, {summary['patches']} training patches, "
        f"mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}"
    )
    create_markdown_artifact(
        key="preprocess-summary",
        markdown="\n".join(
            ["# Preprocessing", "", f"`{data_dir}` -> `{out}`", "", "| split | images |", "|---|---|"]
            + [f"| {s} | {n} |" for s, n in summary["images"].items()]
            + ["", f"{summary['patches']} training patches; stain {stain_method}; mean {mean}; std {std}"]
        ),
    )
    return summary


def preprocess_from_params(
    params: Params, data_dir: str | os.PathLike[str] | None = None, out_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Run :func:`preprocess` with the ``data``, ``stain``, ``split``, ``patches`` and ``checks`` settings."""
    return preprocess(**flow_arguments(params, data_dir, out_dir))


def flow_arguments(
    params: Params, data_dir: str | os.PathLike[str] | None = None, out_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`preprocess` given by the settings (plain values, as Prefect records them)."""
    return {
        "data_dir": str(data_dir if data_dir is not None else params.data.dir),
        "out_dir": str(out_dir if out_dir is not None else params.data.prepared),
        "ignore_suffix": params.data.ignore_suffix,
        "stain_method": params.stain.method,
        "stain_reference": params.stain.reference,
        "split_fractions": (params.split.train, params.split.val, params.split.test),
        "split_seed": params.split.seed,
        "split_explicit": _plain_lists(params.split.explicit),
        "stratify": params.split.stratify,
        "patch_size": params.patches.size,
        "patch_grid": params.patches.grid,
        "checks": params.checks.model_dump(),
    }


def _plain_lists(explicit: Mapping[str, list[str]] | None) -> dict[str, list[str]] | None:
    return None if explicit is None else {k: list(v) for k, v in explicit.items()}
