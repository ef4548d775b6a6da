"""Output safety (nucleiseg.outputs): no command destroys data it did not create, on real files with checksums.

Every case runs the real command on a real dataset folder and compares the SHA-256 of every file before and
after: a refused command must leave every byte where it was, and say why in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import atomic_dir, remove_stale_temporaries, write_image
from nucleiseg.outputs import (
    RECORD_NAME,
    OutputError,
    OutputFolder,
    check_name,
    check_replaceable,
    claim_file,
    is_owned,
    record_files,
)


def checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nucleiseg.synth import write_dataset

    folder = tmp_path_factory.mktemp("template") / "data"
    write_dataset(folder, n_images=3, size=96, seed=3)
    return folder


@pytest.fixture()
def dataset(dataset_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a 3-tile annotated dataset (images and 16-bit labels) in ``tmp_path/data``."""
    folder = tmp_path / "data"
    folder.mkdir()
    for p in dataset_template.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def params_file(tmp_path: Path, dataset: Path, prepared: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        f"data:\n  dir: {dataset}\n  prepared: {prepared}\n"
        "infer: {tile: 64, overlap: 16, batch_size: 4}\npost: {min_area: 5}\n"
        f"tracking:\n  uri: sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}\n  artifacts: {tmp_path / 'mlruns' / 'a'}\n"
    )
    return path


# ----------------------------------------------------------------------------------------------------
# validate and prepare: folders replaced as a whole


@pytest.mark.parametrize("where", ["itself", "parent", "inside"])
def test_validate_refuses_an_output_folder_that_is_near_the_dataset(dataset: Path, where: str) -> None:
    out = {"itself": dataset, "parent": dataset.parent, "inside": dataset / "reports"}[where]
    (dataset.parent / "notes.txt").write_text("the user's notes beside the dataset")
    before = checksums(dataset.parent)
    code, output = run("validate", dataset, "--out", out)
    assert code == 1 and "error:" in output and str(out) in output
    assert checksums(dataset.parent) == before  # the dataset and its neighbours untouched


def test_validate_refuses_an_existing_file_and_a_foreign_folder(dataset: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("not a folder")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("months of work")
    before = checksums(tmp_path)
    for out in (report, foreign):
        code, output = run("validate", dataset, "--out", out)
        assert code == 1 and str(out) in output, output
    assert checksums(tmp_path) == before
    # Asked for: --force replaces the foreign folder (never the file: a file is not a folder).
    code, output = run("validate", dataset, "--out", foreign, "--force")
    assert code == 0, output
    assert not (foreign / "thesis.tex").exists() and (foreign / "report.json").is_file()
    # A folder validate made is its own: the next run replaces it without --force.
    code, output = run("validate", dataset, "--out", foreign)
    assert code == 0, output


@pytest.mark.parametrize("how", ["--out", "--set"])
def test_prepare_refuses_to_replace_the_dataset(dataset: Path, tmp_path: Path, how: str) -> None:
    params = params_file(tmp_path, dataset, tmp_path / "prepared")
    before = checksums(tmp_path)
    extra = ["--out", str(dataset)] if how == "--out" else ["--set", f"data.prepared={dataset}"]
    code, output = run("prepare", "--params", params, *extra)
    assert code == 1 and "is the input" in output, output
    assert checksums(tmp_path) == before


def test_check_replaceable_accepts_folders_of_its_command_only(tmp_path: Path) -> None:
    legacy = tmp_path / "prepared"  # made before records existed: recognised by its files
    legacy.mkdir()
    (legacy / "prepare.json").write_text("{}")
    (legacy / "splits.json").write_text("{}")
    assert check_replaceable(legacy, "prepare") == legacy
    with pytest.raises(OutputError, match="did not make"):
        check_replaceable(legacy, "validate")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_replaceable(empty, "validate") == empty


# ----------------------------------------------------------------------------------------------------
# predict, score, evaluate: files written into a folder


def test_predict_into_the_dataset_is_refused(dataset: Path, tiny_checkpoint: Path) -> None:
    before = checksums(dataset)
    code, output = run("predict", tiny_checkpoint, dataset, "--out", dataset, "--device", "cpu")
    assert code == 1 and "is the input" in output, output
    assert checksums(dataset) == before  # the ground-truth *_label.png are what they were


def test_predict_never_replaces_a_file_it_did_not_write(dataset: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    name = sorted(p.stem for p in dataset.glob("*.png") if not p.stem.endswith("_label"))[0]
    theirs = out / f"{name}_label.png"
    theirs.write_bytes((dataset / f"{name}_label.png").read_bytes())  # the user's ground truth, copied there
    before = checksums(out)
    code, output = run("predict", tiny_checkpoint, dataset / f"{name}.png", "--out", out, "--device", "cpu")
    assert code == 1 and f"{name}_label.png" in output and "--force" in output, output
    assert checksums(out) == before
    # With --force it is replaced; the outputs are then owned, so a second run needs no --force.
    code, output = run("predict", tiny_checkpoint, dataset / f"{name}.png", "--out", out, "--device", "cpu", "--force")
    assert code == 0, output
    assert is_owned(theirs) and is_owned(out / "summary.json")
    code, output = run("predict", tiny_checkpoint, dataset / f"{name}.png", "--out", out, "--device", "cpu")
    assert code == 0, output


def test_predict_output_that_is_a_file_fails_before_any_work(dataset: Path, tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "out.png"
    out.write_bytes(b"a file")
    code, output = run("predict", tiny_checkpoint, dataset, "--out", out, "--device", "cpu")
    assert code == 1 and "is not a folder" in output and "Traceback" not in output
    assert out.read_bytes() == b"a file"


def _splits(tmp_path: Path, dataset: Path, test: list[str]) -> Path:
    names = sorted(p.stem for p in dataset.glob("*.png") if not p.stem.endswith("_label"))
    path = tmp_path / "prepared" / "splits.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"train": names[:1], "val": names[1:2], "test": test}))
    return path


def test_score_predictions_into_the_dataset_are_refused(dataset: Path, tiny_checkpoint: Path, tmp_path: Path):
    names = sorted(p.stem for p in dataset.glob("*.png") if not p.stem.endswith("_label"))
    params = params_file(tmp_path, dataset, tmp_path / "prepared")
    _splits(tmp_path, dataset, names[2:])
    before = checksums(dataset)
    out = tmp_path / "reports" / "metrics.json"
    code, output = run("score", tiny_checkpoint, "--params", params, "--predictions", dataset, "--out", out)
    assert code == 1 and "is the input" in output, output
    assert checksums(dataset) == before and not out.exists()


def test_score_refuses_a_split_name_that_leaves_the_folder(dataset: Path, tiny_checkpoint: Path, tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    params = params_file(tmp_path, dataset, tmp_path / "prepared")
    _splits(tmp_path, dataset, [str(victim)])
    before = checksums(tmp_path)
    preds = tmp_path / "preds"
    out = tmp_path / "m.json"
    code, output = run("score", tiny_checkpoint, "--params", params, "--predictions", preds, "--out", out)
    assert code == 1 and "not a plain file name" in output, output
    assert {k: v for k, v in checksums(tmp_path).items() if not k.startswith("preds/")} == before


def test_evaluate_refuses_a_report_inside_an_input_or_over_a_foreign_file(dataset: Path, tmp_path: Path) -> None:
    before = checksums(tmp_path)
    code, output = run("evaluate", dataset, dataset, "--out", dataset / "report.json")
    assert code == 1 and "inside the input" in output, output
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    code, output = run("evaluate", dataset, dataset, "--out", notes)
    assert code == 1 and "not written by nucleiseg" in output, output
    assert checksums(tmp_path) == {**before, "notes.json": hashlib.sha256(b'{"mine": true}').hexdigest()}
    code, output = run("evaluate", dataset, dataset, "--out", tmp_path / "eval.json")  # a new file: fine
    assert code == 0, output


# ----------------------------------------------------------------------------------------------------
# import and batch


def test_import_into_its_source_or_over_foreign_tiles_is_refused(dataset: Path, tmp_path: Path) -> None:
    src = tmp_path / "annotations"
    src.mkdir()
    label = np.zeros((16, 16), np.uint16)
    label[4:9, 4:9] = 7
    write_image(src / "x.png", np.full((16, 16, 3), 128, np.uint8))
    write_image(src / "x_inst.png", label)
    (src / "x.csv").write_text("id,class\n7,tumor\n")
    before = checksums(tmp_path)
    code, output = run("import", "folder", src, src)
    assert code == 1 and "is the input" in output, output
    (dataset / "x_label.png").write_bytes(b"an annotation of the user's")
    before = checksums(tmp_path)
    code, output = run("import", "folder", src, dataset)
    assert code == 1 and "x_label.png" in output and "--force" in output, output
    assert checksums(tmp_path) == before
    code, output = run("import", "folder", src, tmp_path / "imported")
    assert code == 0, output
    code, output = run("import", "folder", src, tmp_path / "imported")  # its own tiles: replaced freely
    assert code == 0, output


def test_batch_output_inside_the_input_is_refused_before_prefect(dataset: Path, tiny_checkpoint: Path) -> None:
    before = checksums(dataset)
    code, output = run("batch", dataset, dataset / "predictions", "--model", tiny_checkpoint, "--device", "cpu")
    assert code == 1 and "inside the input" in output, output
    assert checksums(dataset) == before


def test_batch_never_replaces_a_file_it_did_not_write(
    prefect_api: None, dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "batch"
    out.mkdir()
    name = sorted(p.stem for p in dataset.glob("*.png") if not p.stem.endswith("_label"))[0]
    (out / f"{name}.geojson").write_text('{"the user": "annotations from QuPath"}')
    before = checksums(out)
    code, output = run("batch", dataset, out, "--model", tiny_checkpoint, "--device", "cpu")
    assert code == 1 and f"{name}.geojson" in output and "--force" in output, output
    assert checksums(out) == before


# ----------------------------------------------------------------------------------------------------
# The helper itself


@pytest.mark.parametrize("name", ["", ".", "..", "/etc/passwd", "../up", "a/b", "a\\b", "nul\x00"])
def test_check_name_refuses_anything_but_one_path_component(name: str) -> None:
    with pytest.raises(OutputError, match="not a plain file name"):
        check_name(name)


def test_check_name_accepts_plain_names() -> None:
    assert check_name("train_1") == "train_1" and check_name(".hidden") == ".hidden"


def test_a_file_changed_after_it_was_written_is_no_longer_owned(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path / "out")
    path = folder.target("a.json")
    path.write_text("{}")
    folder.record([path])
    assert is_owned(path) and folder.claim(["a.json"]) == [path]
    path.write_text('{"edited": "by hand"}')
    assert not is_owned(path)
    with pytest.raises(OutputError, match=r"a\.json"):
        folder.claim(["a.json"])
    assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["files"].keys() == {"a.json"}


def test_claim_file_refuses_an_input_and_a_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OutputError, match="is the input"):
        claim_file(data / "x.json", [data / "x.json"])
    with pytest.raises(OutputError, match="is not a file"):
        claim_file(data)
    out = claim_file(tmp_path / "reports" / "r.json")
    out.write_text("{}")
    record_files(out.parent, [out])
    assert claim_file(out) == out


def test_unwritable_output_folder_is_named() -> None:
    # /proc refuses new files even to root (a read-only folder would not stop root).
    with pytest.raises(OutputError, match=r"/proc: cannot write"):
        OutputFolder("/proc")
    with pytest.raises(OutputError, match=r"/proc/nucleiseg-out: cannot create"):
        OutputFolder("/proc/nucleiseg-out")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_runs_are_removed_and_a_moved_aside_folder_restored(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".a_label.nucleiseg-tmp{dead}-x1y2.png").write_bytes(b"half a label")
    (tmp_path / f".b_label.nucleiseg-tmp{alive}-x1y2.png").write_bytes(b"being written right now")
    aside = tmp_path / f".prepared.nucleiseg-old{dead}-abcd"
    (aside / "prepared").mkdir(parents=True)
    (aside / "prepared" / "splits.json").write_text("{}")  # killed between atomic_dir's two renames
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".a_label.nucleiseg-tmp{dead}-x1y2.png", aside.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b_label.nucleiseg-tmp{alive}-x1y2.png", "prepared"]
    assert (tmp_path / "prepared" / "splits.json").read_text() == "{}"


def test_atomic_dir_temporaries_carry_the_process_id(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as work:
        assert work.name.startswith(f".out.nucleiseg-tmp{os.getpid()}-")
