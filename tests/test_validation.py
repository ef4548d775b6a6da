"""Dataset validation: manifest facts, the GX suite on broken inputs made here, real CoNSeP, the CLI."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import write_image
from nucleiseg.params import ChecksParams
from nucleiseg.validation import (
    MANIFEST_COLUMNS,
    ValidationReport,
    build_manifest,
    manifest_row,
    validate_dataset,
    validate_manifest,
)


def make_tile(rng: np.random.Generator, size: int = 96, n_nuclei: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A pink textured tile with purple disk nuclei, and its label (ids 1..n, classes id % 3)."""
    image = np.empty((size, size, 3), np.uint8)
    image[..., 0] = rng.integers(200, 240, (size, size))
    image[..., 1] = rng.integers(120, 170, (size, size))
    image[..., 2] = rng.integers(170, 210, (size, size))
    label = np.zeros((size, size), np.uint16)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n_nuclei + 1):
        cy, cx = rng.integers(10, size - 10, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        label[disk] = i
        image[disk] = (90, 50, 140)
    return image, label


def write_tile(folder: Path, name: str, rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_tile(rng, size)
    write_image(folder / f"{name}.png", image)
    write_image(folder / f"{name}_label.png", label)
    return image, label


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    for k in range(4):
        write_tile(folder, f"tile_{k}", rng)
    write_image(folder / "tile_0_other.png", np.zeros((96, 96), np.uint16))
    return folder


BROKEN = {
    # file that must be named -> (expectation column, value reported for it)
    "corrupt.png": ("readable", False),
    "wrong_size_label.png": ("size_match", False),
    "rgb_label.png": ("label_ndim", 3),
    "negative_label.tif": ("negative_ids", True),
    "white.png": ("mean_intensity", 255.0),
    "dup.png": ("image_sha256", None),
}


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory: pytest.TempPathFactory, clean_dir: Path) -> Path:
    """The clean tiles plus one broken case per expectation of the issue."""
    folder = tmp_path_factory.mktemp("broken")
    for path in clean_dir.iterdir():
        shutil.copy(path, folder / path.name)
    rng = np.random.default_rng(1)
    write_tile(folder, "corrupt", rng)
    data = (folder / "corrupt.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    _, label = write_tile(folder, "wrong_size", rng)
    write_image(folder / "wrong_size_label.png", label[:80, :90])
    _, label = write_tile(folder, "rgb", rng)
    write_image(folder / "rgb_label.png", np.repeat((label * 40).astype(np.uint8)[..., None], 3, axis=2))
    _, label = write_tile(folder, "negative", rng)
    (folder / "negative_label.png").unlink()
    tifffile.imwrite(folder / "negative_label.tif", -label.astype(np.int32))
    image, label = make_tile(rng)
    write_image(folder / "white.png", np.full_like(image, 255))
    write_image(folder / "white_label.png", np.zeros_like(label))
    shutil.copy(folder / "tile_1.png", folder / "dup.png")
    shutil.copy(folder / "tile_1_label.png", folder / "dup_label.png")
    return folder


@pytest.fixture(scope="module")
def broken_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports") / "validation"


@pytest.fixture(scope="module")
def broken_report(broken_dir: Path, broken_out: Path) -> ValidationReport:
    return validate_dataset(broken_dir, ChecksParams(), broken_out)


# --- manifest ---------------------------------------------------------------------------------------


def test_manifest_records_facts_of_each_tile(clean_dir: Path) -> None:
    manifest = build_manifest(clean_dir)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest["name"].tolist() == [f"tile_{k}" for k in range(4)]
    row = manifest.iloc[0]
    assert (row.height, row.width, row.channels, row.image_dtype) == (96, 96, 3, "uint8")
    assert (row.label_dtype, row.label_ndim, row.size_match, row.readable) == ("uint16", 2, True, True)
    assert row.other_file == "tile_0_other.png" and manifest.iloc[1].other_file == ""
    # Counts against the label itself (write_tile is deterministic for the seed).
    from nucleiseg.io import read_raw

    label = read_raw(clean_dir / "tile_0_label.png")
    ids = np.unique(label[label > 0])
    assert row.n_nuclei == len(ids)
    assert [row.n_tumor, row.n_lymphocyte, row.n_stroma] == [int(np.sum(ids % 3 == c)) for c in range(3)]
    assert row.nucleus_fraction == pytest.approx(np.mean(label > 0))
    assert row.split_ids == 0 and not row.negative_ids


def test_manifest_counts_split_ids_and_keeps_touching_nuclei_apart(tmp_path: Path) -> None:
    image, _ = make_tile(np.random.default_rng(2), n_nuclei=0)
    label = np.zeros((96, 96), np.uint16)
    label[10:20, 10:20] = 3  # id 3 in two pieces...
    label[40:50, 40:50] = 3
    label[60:70, 10:20] = 4  # ...ids 4 and 7 touch but are whole
    label[60:70, 20:30] = 7
    label[80:82, 80:82] = 5  # id 5 in two diagonal-touching pieces: one 8-connected piece
    label[82:84, 82:84] = 5
    write_image(tmp_path / "a.png", image)
    write_image(tmp_path / "a_label.png", label)
    row = manifest_row(tmp_path / "a.png")
    assert row["split_ids"] == 1
    assert row["n_nuclei"] == 4 and (row["n_tumor"], row["n_lymphocyte"], row["n_stroma"]) == (1, 2, 1)


def test_corrupt_file_becomes_a_row_with_the_error(broken_dir: Path) -> None:
    manifest = build_manifest(broken_dir)
    row = manifest.set_index("name").loc["corrupt"]
    assert not row.readable
    assert "corrupt.png" in row.error and "readable" in row.error
    assert manifest.set_index("name").loc["tile_0"].readable


def test_missing_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_manifest(tmp_path / "nowhere")


# --- the suite ---------------------------------------------------------------------------------------


def test_clean_dataset_passes(clean_dir: Path, tmp_path: Path) -> None:
    report = validate_dataset(clean_dir, ChecksParams(), tmp_path / "validation")
    assert report.success, report.summary()
    assert report.n_images == 4 and report.n_expectations >= 15
    assert not report.failures and not report.warnings


@pytest.mark.parametrize("file", sorted(BROKEN))
def test_each_broken_input_fails_its_expectation_and_names_the_file(broken_report: ValidationReport, file: str) -> None:
    column, value = BROKEN[file]
    assert not broken_report.success
    matching = [f for f in broken_report.failures if f.column == column]
    assert matching, f"no failure on {column}: {broken_report.summary()}"
    failure = matching[0]
    assert file in failure.files
    if value is not None:
        assert failure.values[failure.files.index(file)] == value
    assert file in broken_report.summary()


def test_duplicate_names_both_copies_and_clean_tiles_are_not_blamed(broken_report: ValidationReport) -> None:
    (dup,) = [f for f in broken_report.failures if f.column == "image_sha256"]
    assert sorted(dup.files) == ["dup.png", "tile_1.png"]
    assert dup.values[0] == dup.values[1]
    assert "tile_0.png" not in broken_report.offending_files
    assert "tile_2.png" not in broken_report.offending_files
    (unreadable,) = [f for f in broken_report.failures if f.column == "readable"]
    assert unreadable.files == ["corrupt.png"] and "corrupt.png" in unreadable.details[0]


def test_artifacts_are_written_and_serialisable(broken_report: ValidationReport, broken_out: Path) -> None:
    out = broken_out
    assert (out / "data_docs" / "index.html").is_file()
    result = json.loads((out / "validation_result.json").read_text())
    assert result["success"] is False and len(result["results"]) == broken_report.n_expectations
    saved = ValidationReport.from_dict(json.loads((out / "report.json").read_text()))
    assert saved == broken_report
    assert (out / "manifest.csv").read_text().count("\n") == broken_report.n_images + 1
    assert "corrupt.png" in broken_report.to_markdown()


def test_thresholds_come_from_checks(clean_dir: Path) -> None:
    manifest = build_manifest(clean_dir)
    strict = ChecksParams(min_images=5, max_nucleus_fraction=0.01, min_side=100)
    report = validate_manifest(manifest, strict)
    failed = {(f.expectation, f.column) for f in report.failures}
    assert ("expect_table_row_count_to_be_between", None) in failed
    assert ("expect_column_values_to_be_between", "nucleus_fraction") in failed
    assert ("expect_column_values_to_be_between", "height") in failed
    (rows,) = [f for f in report.failures if f.column is None]
    assert rows.observed == 4


def test_duplicates_allowed_and_split_ids_only_warn(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for k in range(3):
        write_tile(tmp_path, f"t{k}", rng)
    shutil.copy(tmp_path / "t0.png", tmp_path / "t3.png")
    _, label = make_tile(rng, n_nuclei=0)
    label[5:10, 5:10] = label[50:60, 50:60] = 6
    write_image(tmp_path / "t3_label.png", label)
    report = validate_manifest(build_manifest(tmp_path), ChecksParams(allow_duplicates=True))
    assert report.success, report.summary()
    (warning,) = report.warnings
    assert warning.column == "split_ids" and warning.files == ["t3_label.png"] and warning.severity == "warning"


def test_rewriting_the_output_folder_replaces_it_whole(clean_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "validation"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    validate_dataset(clean_dir, ChecksParams(), out)
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["validation"]  # no temporary folders left


def test_real_consep_tiles_are_valid(consep_dir: Path) -> None:
    report = validate_dataset(consep_dir, ChecksParams())
    assert report.success, report.summary()
    assert report.n_images == 27


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_validate_exit_codes(clean_dir: Path, broken_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    params = tmp_path / "params.yaml"
    params.write_text("checks:\n  min_images: 3\n")
    ok = runner.invoke(app, ["validate", str(clean_dir), "--params", str(params), "--out", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output and (tmp_path / "a" / "data_docs" / "index.html").is_file()
    bad = runner.invoke(app, ["validate", str(broken_dir), "--params", str(params), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 1
    for file in BROKEN:
        assert file in bad.output
    assert "INVALID" in bad.output
    override = runner.invoke(
        app, ["validate", str(clean_dir), "--set", "checks.min_images=10", "--out", str(tmp_path / "c")]
    )
    assert override.exit_code == 1 and "at least 10 tiles" in override.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    assert missing.exit_code == 1 and "nowhere" in missing.output


# --- the offline page ---------------------------------------------------------------------------------


class _Resources(HTMLParser):
    """The tags of a page and every URL it would load (src, href, CSS url())."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"url\(([^)]*)\)", data)


def test_offline_page_shows_every_expectation_and_the_offending_files(
    broken_report: ValidationReport, broken_out: Path
) -> None:
    page = (broken_out / "report.html").read_text()
    resources = _Resources()
    resources.feed(page)
    assert resources.urls == [] and "script" not in resources.tags and "link" not in resources.tags
    assert resources.tags.count("tr") == broken_report.n_expectations + 1  # a header, then one per expectation
    assert page.count('class="fail">FAIL') == len(broken_report.failures) and "INVALID" in page
    for file in BROKEN:
        assert file in page
