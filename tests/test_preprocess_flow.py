"""The Prefect preprocessing flow, run for real (temporary Prefect API) on a tiny synthetic dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import read_image, write_image
from nucleiseg.labels import read_label
from nucleiseg.prepare import channel_stats, grid_patches, read_splits, read_stats
from nucleiseg.stain import load_normalizer
from nucleiseg.synth import write_dataset
from nucleiseg.validation import DatasetValidationError

SIZE, PATCH, GRID = 256, 128, 2
FLOW_ARGS = {
    "stain_method": "macenko",
    "split_fractions": (0.5, 0.25, 0.25),
    "split_seed": 0,
    "patch_size": PATCH,
    "patch_grid": GRID,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    write_dataset(folder, n_images=6, size=SIZE, seed=0)
    return folder


@pytest.fixture(scope="module")
def params_file(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = tmp_path_factory.mktemp("params") / "params.yaml"
    params.write_text(
        f"data:\n  dir: {dataset}\nstain:\n  method: macenko\nsplit:\n  train: 0.5\n  val: 0.25\n  test: 0.25\n"
        f"patches:\n  size: {PATCH}\n  grid: {GRID}\naugmentation:\n  crop: 96\n"
    )
    return params


@pytest.fixture(scope="module")
def prepared(prefect_api: None, params_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of ``nucleiseg prepare`` (the CLI runs the flow) on the synthetic dataset."""
    root = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(app, ["prepare", "--params", str(params_file), "--out", str(root / "prepared")])
    assert result.exit_code == 0, result.output
    assert "3 train, 2 val, 1 test images, 12 training patches" in result.output
    return root / "prepared"


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the validation artifacts (they hold timestamps)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "validation"
    }


def test_flow_writes_the_documented_layout(prepared: Path, dataset: Path) -> None:
    names = sorted(p.stem for p in dataset.glob("synth_???.png"))
    splits = read_splits(prepared / "splits.json")
    assert sorted(n for s in splits.values() for n in s) == names
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 1]
    for split, members in splits.items():
        for name in members:
            assert (prepared / "images" / split / f"{name}.png").is_file()
            label = read_label(prepared / "images" / split / f"{name}_label.png")
            np.testing.assert_array_equal(label, read_label(dataset / f"{name}_label.png"))
    assert (prepared / "validation" / "data_docs" / "index.html").is_file()
    assert json.loads((prepared / "validation" / "report.json").read_text())["success"] is True
    manifest = (prepared / "manifest.csv").read_text().splitlines()
    assert "split" in manifest[0].split(",") and len(manifest) == 7
    provenance = json.loads((prepared / "prepare.json").read_text())
    from pipelines.preprocess import dataset_digest

    assert provenance["data_sha256"] == dataset_digest(dataset)
    assert provenance["stain"] == {"method": "macenko", "reference": splits["train"][0]}
    assert [p.name for p in prepared.parent.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_images_are_stain_normalised_and_patches_cut_from_them(prepared: Path, dataset: Path) -> None:
    splits = read_splits(prepared / "splits.json")
    normalizer = load_normalizer(prepared / "stain.json")
    assert normalizer.method == "macenko"
    name = splits["val"][0]
    expected = normalizer.transform(read_image(dataset / f"{name}.png"))
    np.testing.assert_array_equal(read_image(prepared / "images" / "val" / f"{name}.png"), expected)

    patches = prepared / "patches" / "train"
    assert len(list(patches.glob("*_p?.png"))) == len(splits["train"]) * GRID * GRID
    assert not any(patches.glob(f"{splits['val'][0]}_p*"))  # only training tiles are patched
    name = splits["train"][0]
    image = read_image(prepared / "images" / "train" / f"{name}.png")
    label = read_label(dataset / f"{name}_label.png")
    for k, (y, x) in enumerate(grid_patches(image, PATCH, GRID)):
        np.testing.assert_array_equal(read_image(patches / f"{name}_p{k}.png"), image[y : y + PATCH, x : x + PATCH])
        np.testing.assert_array_equal(
            read_label(patches / f"{name}_p{k}_label.png"), label[y : y + PATCH, x : x + PATCH]
        )


def test_stats_are_those_of_the_normalised_training_images(prepared: Path) -> None:
    splits = read_splits(prepared / "splits.json")
    mean, std = read_stats(prepared / "stats.json")
    images = [read_image(prepared / "images" / "train" / f"{n}.png") for n in splits["train"]]
    ref_mean, ref_std = channel_stats(images)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=0, atol=1e-12)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-9)


def test_rerun_hits_the_cache_and_reproduces_the_outputs(
    prepared: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.preprocess as pipeline

    def cache_miss(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed although its inputs did not change")

    # The cached tasks must not call their functions again; validation itself always runs.
    monkeypatch.setattr(pipeline, "build_manifest", cache_miss)
    monkeypatch.setattr(pipeline, "fit_normalizer", cache_miss)
    before = snapshot(prepared)
    summary = pipeline.preprocess(str(dataset), str(prepared), **FLOW_ARGS)
    assert summary["images"] == {"train": 3, "val": 2, "test": 1}
    assert snapshot(prepared) == before  # deterministic: byte-identical outputs


def test_invalid_dataset_stops_the_flow_and_keeps_the_previous_outputs(
    prepared: Path, dataset: Path, params_file: Path, tmp_path: Path
) -> None:
    before = snapshot(prepared)
    validation_before = (prepared / "validation" / "validation_result.json").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    image = read_image(broken / "synth_001.png")
    write_image(broken / "synth_001.png", np.full_like(image, 255))  # no tissue
    data = (broken / "synth_004.png").read_bytes()
    (broken / "synth_004.png").write_bytes(data[: len(data) // 3])  # truncated
    args = ["prepare", "--params", str(params_file), "--data-dir", str(broken), "--out", str(prepared)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "synth_001.png" in result.output and "synth_004.png" in result.output
    assert "mean intensity" in result.output and "left unchanged" in result.output
    assert snapshot(prepared) == before
    assert (prepared / "validation" / "validation_result.json").read_bytes() == validation_before
    assert [p.name for p in prepared.parent.iterdir() if p.name.startswith(".")] == []


def test_failure_after_validation_also_keeps_the_previous_outputs(prepared: Path, dataset: Path) -> None:
    from pipelines.preprocess import preprocess

    before = snapshot(prepared)
    with pytest.raises(ValueError, match="no_such_tile"):
        preprocess(str(dataset), str(prepared), stain_reference="no_such_tile", **FLOW_ARGS)
    assert snapshot(prepared) == before
    assert [p.name for p in prepared.parent.iterdir() if p.name.startswith(".")] == []


def test_validation_error_carries_the_report(prefect_api: None, dataset: Path, tmp_path: Path) -> None:
    from pipelines.preprocess import preprocess

    with pytest.raises(DatasetValidationError) as info:
        preprocess(str(dataset), str(tmp_path / "out"), checks={"min_images": 7}, **FLOW_ARGS)
    (failure,) = info.value.report.failures
    assert failure.expectation == "expect_table_row_count_to_be_between" and failure.observed == 6
    assert not (tmp_path / "out").exists()


def test_transient_write_error_is_retried(
    prepared: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.preprocess as pipeline

    calls: list[str] = []
    real_write_image = pipeline.write_image

    def flaky_write_image(path: Path, array: np.ndarray) -> None:
        calls.append(Path(path).name)
        if Path(path).name == "synth_003.png" and calls.count("synth_003.png") == 1:
            raise OSError("network filesystem hiccup")
        real_write_image(path, array)

    monkeypatch.setattr(pipeline, "write_image", flaky_write_image)
    pipeline.preprocess(str(dataset), str(tmp_path / "out"), **FLOW_ARGS)
    assert calls.count("synth_003.png") == 2
    assert snapshot(tmp_path / "out") == snapshot(prepared)  # the same outputs as an undisturbed run


def test_failing_images_are_all_named_and_nothing_is_published(
    prepared: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.preprocess as pipeline

    real_write_label = pipeline.write_label
    written: list[str] = []

    def broken_write_label(path: Path, label: np.ndarray) -> None:
        if Path(path).name in ("synth_001_label.png", "synth_004_label.png"):
            raise ValueError(f"{path}: cannot encode")  # not transient: no retry
        written.append(Path(path).name)
        real_write_label(path, label)

    monkeypatch.setattr(pipeline, "write_label", broken_write_label)
    before = snapshot(prepared)
    with pytest.raises(pipeline.PreprocessError) as info:
        pipeline.preprocess(str(dataset), str(prepared), **FLOW_ARGS)
    message = str(info.value)
    assert message.startswith("2 of 6 image(s) failed") and "synth_001" in message and "synth_004" in message
    assert len(written) == 4  # the other images were still processed
    assert snapshot(prepared) == before
