"""Dataset validation: a per-image manifest checked by a Great Expectations (GX Core 1.x) suite.

Definitions
-----------
dataset folder
    Annotated H&E tiles ``<name>.<ext>``, each with its label ``<name>_label.<ext>`` (see
    :mod:`nucleiseg.labels`) and optionally an ignore map ``<name>_other.<ext>`` (nuclei of no class).
manifest
    One row per tile (:func:`build_manifest`, columns in :data:`MANIFEST_COLUMNS`): what the files are
    (size, channels, dtype, label dtype and dimensions), what they hold (nuclei per class, fraction of
    nucleus pixels, mean and spread of intensity) and whether they are consistent (image and label sizes
    match, ids are non-negative, no id is split into disconnected pieces, no tile duplicates another).
    A file that cannot be decoded becomes a row with ``readable = False`` and the reason in ``error``;
    building the manifest never stops at a bad file.
expectation suite
    The checks the manifest must pass (:func:`build_suite`), with thresholds from ``params.yaml``
    (section ``checks``, :class:`nucleiseg.params.ChecksParams`). Each expectation carries a severity:
    ``critical`` ones make the dataset invalid, ``warning`` ones (ids split in pieces) are reported only.
validation report
    :class:`ValidationReport`: which expectations failed and, for each, the offending files, as text
    (:meth:`ValidationReport.summary`), Markdown, or JSON.

Artifacts (:func:`validate_manifest` with ``out_dir``), replaced as a whole so that a reader never sees a
mix of two runs::

    out_dir/report.json             the ValidationReport
    out_dir/validation_result.json  GX's ExpectationSuiteValidationResult
    out_dir/manifest.csv            the manifest
    out_dir/report.html             the report and every expectation's result as one self-contained page
                                    (nucleiseg.validation_html: renders offline)
    out_dir/data_docs/index.html    GX Data Docs (HTML) for the suite and this validation (CDN styles and
                                    scripts: blank without a network)

``great_expectations`` takes seconds to import, so it is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from nucleiseg.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    list_images,
    read_raw,
    write_json_atomic,
    write_text_atomic,
)
from nucleiseg.labels import CLASS_NAMES
from nucleiseg.outputs import replaced_folder
from nucleiseg.params import ChecksParams
from nucleiseg.validation_html import validation_html

if TYPE_CHECKING:
    import great_expectations as gx

SUITE_NAME = "nucleiseg-dataset"
ID_COLUMNS = ["file", "label_file", "other_file"]  # name the offending files in GX results
LABEL_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")

MANIFEST_COLUMNS = (
    "name",  # tile stem; outputs are named after it, so it must be unique
    "file",  # image file name inside the dataset folder
    "path",
    "readable",  # the image, its label and its ignore map (when present) all decode
    "error",  # why not ("" when readable)
    "height",
    "width",
    "channels",
    "image_dtype",
    "mean_intensity",  # mean pixel value over the colour channels, on the 0-255 scale
    "std_intensity",
    "image_sha256",  # of the decoded pixels (dtype, shape, values): duplicates share it
    "label_file",
    "label_exists",
    "label_dtype",
    "label_ndim",
    "label_height",
    "label_width",
    "size_match",  # label height x width == image height x width
    "negative_ids",
    "max_id",
    "n_nuclei",
    *(f"n_{c}" for c in CLASS_NAMES),
    "nucleus_fraction",  # fraction of the tile's pixels inside a nucleus
    "split_ids",  # ids whose pixels form several 8-connected pieces
    "other_file",  # ignore map ("" when there is none)
    "other_size_match",
    "n_other",
)


class DatasetValidationError(ValueError):
    """The dataset failed its expectation suite; ``report`` says which expectations and files."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


def _companion(image: Path, suffix: str) -> Path | None:
    """``<stem><suffix>.<ext>`` beside ``image``, preferring the image's own extension."""
    exts = (image.suffix, *(e for e in IMAGE_SUFFIXES if e != image.suffix.lower()))
    for ext in exts:
        candidate = image.with_name(f"{image.stem}{suffix}{ext}")
        if candidate.is_file():
            return candidate
    return None


def _label_stats(label: np.ndarray) -> dict[str, Any]:
    """Nuclei per class, nucleus fraction and split ids of a 2-D integer label (negative ids ignored)."""
    from skimage.measure import label as connected_components

    negative = bool(np.issubdtype(label.dtype, np.signedinteger) and label.size and label.min() < 0)
    lab = np.where(label > 0, label, 0) if negative else label
    fg = lab > 0
    max_id = int(lab.max()) if lab.size else 0
    if max_id <= 10_000_000:  # a histogram is O(pixels), no sort
        present = np.flatnonzero(np.bincount(lab[fg].ravel().astype(np.int64), minlength=max_id + 1))
    else:
        present = np.unique(lab[fg])
    present = present[present > 0]
    stats: dict[str, Any] = {"negative_ids": negative, "max_id": max_id, "n_nuclei": len(present)}
    for c, cname in enumerate(CLASS_NAMES):
        stats[f"n_{cname}"] = int(np.count_nonzero(present % 3 == c))
    stats["nucleus_fraction"] = float(fg.mean()) if lab.size else 0.0
    split = 0
    if len(present):
        # skimage labels connected runs of *equal* values, so touching nuclei stay apart.
        components = connected_components(lab, background=0, connectivity=2)
        n_components = int(components.max())
        if n_components != len(present):
            id_of_component = np.zeros(n_components + 1, dtype=np.int64)
            id_of_component[components[fg]] = lab[fg]
            _, pieces = np.unique(id_of_component[1:], return_counts=True)
            split = int(np.count_nonzero(pieces > 1))
    stats["split_ids"] = split
    return stats


def _intensity(image: np.ndarray) -> tuple[float, float]:
    colour = image[..., :3] if image.ndim == 3 else image
    scale = 255.0 / np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    values = colour.astype(np.float32) * scale
    return float(values.mean()), float(values.std())


def manifest_row(image_path: str | os.PathLike[str], ignore_suffix: str = "_other") -> dict[str, Any]:
    """The manifest row of one tile. Never raises for a bad file: ``readable``/``error`` record it."""
    path = Path(image_path)
    label_path = _companion(path, "_label")
    other_path = _companion(path, ignore_suffix) if ignore_suffix else None
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(
        name=path.stem,
        file=path.name,
        path=str(path),
        label_file=label_path.name if label_path else "",
        label_exists=label_path is not None,
        other_file=other_path.name if other_path else "",
    )
    errors: list[str] = []
    image = label = None
    try:
        image = read_raw(path)
    except (ImageReadError, OSError) as exc:
        errors.append(str(exc))
    if image is not None:
        row.update(height=image.shape[0], width=image.shape[1], image_dtype=str(image.dtype))
        row["channels"] = image.shape[2] if image.ndim == 3 else 1
        row["mean_intensity"], row["std_intensity"] = _intensity(image)
        digest = hashlib.sha256(f"{image.dtype}{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).data)
        row["image_sha256"] = digest.hexdigest()
    if label_path is not None:
        try:
            label = read_raw(label_path)
        except (ImageReadError, OSError) as exc:
            errors.append(str(exc))
    if label is not None:
        row.update(label_dtype=str(label.dtype), label_ndim=label.ndim)
        row.update(label_height=label.shape[0], label_width=label.shape[1] if label.ndim > 1 else None)
        if image is not None:
            row["size_match"] = label.shape[:2] == image.shape[:2]
        if label.ndim == 2 and np.issubdtype(label.dtype, np.integer):
            row.update(_label_stats(label))
    if other_path is not None:
        try:
            other = read_raw(other_path)
        except (ImageReadError, OSError) as exc:
            errors.append(str(exc))
        else:
            if image is not None:
                row["other_size_match"] = other.ndim == 2 and other.shape == image.shape[:2]
            if other.ndim == 2 and np.issubdtype(other.dtype, np.integer):
                row["n_other"] = int(np.unique(other[other > 0]).size)
    else:
        row["other_size_match"] = True
    row["readable"] = not errors
    row["error"] = "; ".join(errors)
    return row


def build_manifest(
    data_dir: str | os.PathLike[str], ignore_suffix: str = "_other", workers: int | None = None
) -> pd.DataFrame:
    """One row per tile of ``data_dir`` (columns :data:`MANIFEST_COLUMNS`), sorted by file name.

    Tiles are the image files that are not ``*_label`` or ``*<ignore_suffix>`` files. Reading runs on
    ``workers`` threads (default: the CPU count; decoding releases the GIL). Raises
    :class:`FileNotFoundError` when ``data_dir`` is not a folder.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found")
    suffixes = tuple(s for s in ("_label", ignore_suffix) if s)
    images = list_images(folder, exclude_suffixes=suffixes)
    workers = max(1, min(workers or os.cpu_count() or 1, len(images) or 1))
    if workers == 1:
        rows = [manifest_row(p, ignore_suffix) for p in images]
    else:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(lambda p: manifest_row(p, ignore_suffix), images))
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


# ----------------------------------------------------------------------------------------------------------
# Expectation suite
# ----------------------------------------------------------------------------------------------------------


def build_suite(checks: ChecksParams | None = None) -> gx.ExpectationSuite:
    """The expectation suite for a manifest, with thresholds from ``checks`` (defaults when ``None``).

    Every expectation has a ``description`` (shown in reports and Data Docs) and ``meta["subject"]``, the
    file an offending row is blamed on: ``image``, ``label``, ``other`` (the ignore map) or ``dataset``.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    c = checks or ChecksParams()
    suite = gx.ExpectationSuite(name=SUITE_NAME)

    def add(expectation: gxe.Expectation, subject: str) -> None:
        expectation.meta = {"subject": subject}
        suite.add_expectation(expectation)

    add(
        gxe.ExpectTableRowCountToBeBetween(min_value=c.min_images, description=f"at least {c.min_images} tiles"),
        "dataset",
    )
    add(gxe.ExpectColumnValuesToBeUnique(column="name", description="tile names are unique"), "image")
    add(gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True], description="files decode"), "image")
    add(
        gxe.ExpectColumnValuesToBeInSet(column="label_exists", value_set=[True], description="label file exists"),
        "image",
    )
    add(gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[3], description="image is RGB"), "image")
    add(
        gxe.ExpectColumnValuesToBeInSet(column="image_dtype", value_set=["uint8"], description="image is 8-bit"),
        "image",
    )
    for side in ("height", "width"):
        add(
            gxe.ExpectColumnValuesToBeBetween(
                column=side,
                min_value=c.min_side,
                max_value=c.max_side,
                description=f"image {side} between {c.min_side} and {c.max_side} px",
            ),
            "image",
        )
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="mean_intensity",
            min_value=c.min_mean_intensity,
            max_value=c.max_mean_intensity,
            description=f"mean intensity between {c.min_mean_intensity} and {c.max_mean_intensity} (not blank)",
        ),
        "image",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="std_intensity",
            min_value=c.min_intensity_std,
            description=f"intensity standard deviation at least {c.min_intensity_std} (not a flat fill)",
        ),
        "image",
    )
    if not c.allow_duplicates:
        add(gxe.ExpectColumnValuesToBeUnique(column="image_sha256", description="no duplicated images"), "image")
    add(gxe.ExpectColumnValuesToBeInSet(column="label_ndim", value_set=[2], description="label is 2-D"), "label")
    add(
        gxe.ExpectColumnValuesToBeInSet(
            column="label_dtype", value_set=list(LABEL_DTYPES), description="label holds integer ids"
        ),
        "label",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(column="size_match", value_set=[True], description="label size = image size"),
        "label",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(column="negative_ids", value_set=[False], description="no negative ids"),
        "label",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="nucleus_fraction",
            min_value=0,
            max_value=c.max_nucleus_fraction,
            description=f"at most {c.max_nucleus_fraction:.0%} of the tile inside nuclei",
        ),
        "label",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(
            column="other_size_match", value_set=[True], description="ignore map size = image size"
        ),
        "other",
    )
    # A split id is odd (one nucleus in several pieces) but trains and evaluates fine: warn, don't block.
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="split_ids", max_value=0, severity="warning", description="no id split into disconnected pieces"
        ),
        "label",
    )
    return suite


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExpectationFailure:
    """One failed expectation: what it checks, how bad it is, and the offending files with their values."""

    expectation: str  # GX type, e.g. expect_column_values_to_be_in_set
    description: str
    severity: str  # critical | warning
    column: str | None = None
    files: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)  # the offending value of each file, same order
    observed: Any = None  # for table-level expectations (row count)
    details: list[str] = field(default_factory=list)  # decoder errors of unreadable files

    def line(self) -> str:
        where = f"{self.expectation}" + (f" on {self.column}" if self.column else "")
        head = f"{self.severity.upper()}: {self.description} ({where})"
        if self.observed is not None:
            head += f": observed {self.observed}"
        if self.files:
            head += f": {len(self.files)} file(s)"
        body = [f"    {f}: {_show(v)}" for f, v in zip(self.files, self.values, strict=True)]
        body += [f"    {d}" for d in self.details]
        return "\n".join([head, *body])


@dataclass
class ValidationReport:
    """The outcome of validating a dataset; ``success`` is False when any critical expectation failed."""

    dataset: str
    n_images: int
    n_expectations: int
    failures: list[ExpectationFailure]  # critical
    warnings: list[ExpectationFailure]

    @property
    def success(self) -> bool:
        return not self.failures

    @property
    def offending_files(self) -> list[str]:
        """Every file named by a critical failure, sorted, each once."""
        return sorted({f for fail in self.failures for f in fail.files})

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_scalar)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        data = {k: v for k, v in data.items() if k != "success"}
        data["failures"] = [ExpectationFailure(**f) for f in data["failures"]]
        data["warnings"] = [ExpectationFailure(**f) for f in data["warnings"]]
        return cls(**data)

    def summary(self) -> str:
        """A readable report: verdict, then each failed expectation with its offending files."""
        n_fail, n_warn = len(self.failures), len(self.warnings)
        verdict = "valid" if self.success else "INVALID"
        counts = f"{self.n_images} tiles, {self.n_expectations} expectations, {n_fail} failed, {n_warn} warning(s)"
        lines = [f"dataset {self.dataset or '(manifest)'}: {verdict} ({counts})"]
        lines += [f.line() for f in [*self.failures, *self.warnings]]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        verdict = "valid" if self.success else "**invalid**"
        counts = f"{self.n_expectations} expectations, {len(self.failures)} failed, {len(self.warnings)} warnings"
        lines = [f"# Dataset validation: {verdict}", "", f"`{self.dataset}`: {self.n_images} tiles, {counts}", ""]
        if self.failures or self.warnings:
            lines += ["| severity | expectation | column | files |", "|---|---|---|---|"]
            for f in [*self.failures, *self.warnings]:
                files = ", ".join(f"{n} ({v})" for n, v in zip(f.files, f.values, strict=True))
                if f.observed is not None:
                    files = f"observed {f.observed}"
                lines.append(f"| {f.severity} | {f.description} | {f.column or ''} | {files} |")
        return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, str) and len(value) == 64:  # a SHA-256
        return f"sha256 {value[:12]}..."
    return str(value)


def _json_scalar(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def _failure(result: dict[str, Any], manifest: pd.DataFrame) -> ExpectationFailure:
    config = result["expectation_config"]
    kwargs = config.get("kwargs", {})
    column = kwargs.get("column")
    meta = config.get("meta") or {}
    subject = meta.get("subject", "image")  # image | label | other: which file of the row to name
    failure = ExpectationFailure(
        expectation=config["type"],
        description=config.get("description") or config["type"],
        severity=str(config.get("severity") or "critical"),
        column=column,
    )
    res = result.get("result") or {}
    if result.get("exception_info", {}).get("raised_exception"):
        failure.observed = f"expectation raised: {result['exception_info'].get('exception_message')}"
        return failure
    if column is None:
        failure.observed = _plain(res.get("observed_value"))
        return failure
    seen: set[str] = set()
    for entry in res.get("unexpected_index_list") or []:
        image_file = entry["file"]
        failure.files.append(entry.get(f"{subject}_file") or image_file)
        failure.values.append(_plain(entry.get(column)))
        if column == "readable" and image_file not in seen:  # the decoder's message names the bad file
            seen.add(image_file)
            failure.details += [e for e in manifest.loc[manifest["file"] == image_file, "error"] if e]
    return failure


def _make_context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["nucleiseg"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suite(
    manifest: pd.DataFrame, checks: ChecksParams | None = None, docs_dir: Path | None = None
) -> dict[str, Any]:
    """Validate ``manifest`` with :func:`build_suite` in an ephemeral GX context; the GX result as a dict.

    With ``docs_dir``, GX Data Docs for the suite and this validation are built there.
    """
    import great_expectations as gx

    context = _make_context(docs_dir)
    batch = context.data_sources.add_pandas("manifest").add_dataframe_asset("tiles")
    batch_definition = batch.add_batch_definition_whole_dataframe("all tiles")
    suite = context.suites.add(build_suite(checks))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="dataset", data=batch_definition, suite=suite)
    )
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["nucleiseg"])] if docs_dir else []
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="nucleiseg-dataset",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ID_COLUMNS},
        )
    )
    # GX treats NaN/None as missing and skips them in column checks; the readable/label_exists checks cover them.
    result = checkpoint.run(batch_parameters={"dataframe": manifest.reset_index(drop=True)})
    (suite_result,) = result.run_results.values()
    return suite_result.to_json_dict()


def validate_manifest(
    manifest: pd.DataFrame,
    checks: ChecksParams | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    dataset: str = "",
) -> ValidationReport:
    """Check ``manifest`` against the expectation suite; optionally keep the artifacts in ``out_dir``.

    ``out_dir`` is replaced as a whole (built beside it, then swapped in), with ``report.json``, ``report.html``,
    ``validation_result.json``, ``manifest.csv`` and ``data_docs/`` (check it first with
    :func:`nucleiseg.outputs.check_replaceable`: this function replaces whatever is there).
    """
    with _atomic_dir(out_dir) as work:
        gx_result = run_suite(manifest, checks, docs_dir=work / "data_docs" if work else None)
        failed = [_failure(r, manifest) for r in gx_result["results"] if not r["success"]]
        report = ValidationReport(
            dataset=dataset,
            n_images=len(manifest),
            n_expectations=len(gx_result["results"]),
            failures=[f for f in failed if f.severity == "critical"],
            warnings=[f for f in failed if f.severity != "critical"],
        )
        if work is not None:
            write_json_atomic(work / "validation_result.json", gx_result)
            write_text_atomic(work / "report.json", report.to_json() + "\n")
            write_text_atomic(work / "report.html", validation_html(gx_result, report))
            write_text_atomic(work / "manifest.csv", manifest.to_csv(index=False))
    return report


def validate_dataset(
    data_dir: str | os.PathLike[str],
    checks: ChecksParams | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    ignore_suffix: str = "_other",
) -> ValidationReport:
    """:func:`build_manifest` then :func:`validate_manifest`: the whole check of a dataset folder."""
    manifest = build_manifest(data_dir, ignore_suffix)
    return validate_manifest(manifest, checks, out_dir, dataset=str(data_dir))


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """:func:`nucleiseg.outputs.replaced_folder` (for validate), or nothing to write when ``path`` is None."""
    if path is None:
        yield None
        return
    with replaced_folder(path, "validate") as work:
        yield work
