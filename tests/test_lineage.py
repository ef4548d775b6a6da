"""What a training run shows in MLflow: grouped metric names, split datasets with their DVC digest, the test figures
on the run and its logged model, the report and confusion matrix as artifacts, the model-training experiment view;
and the page a browser draws from that store (headless Chromium over `mlflow server` on loopback)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_SETTINGS
from typer.testing import CliRunner

from nucleiseg import lineage
from nucleiseg.cli import app
from nucleiseg.io import read_image
from nucleiseg.params import load_params
from nucleiseg.prepare import read_splits
from nucleiseg.train import train


def test_metric_names_are_grouped_by_slash() -> None:
    names = {k: lineage.metric_name(k) for k in ("train_loss", "train_ce", "val_f1", "val_accuracy", "lr", "test/x")}
    assert names == {"train_loss": "train/loss", "train_ce": "train/ce", "val_f1": "val/f1",
                     "val_accuracy": "val/accuracy", "lr": "train/lr", "test/x": "test/x"}  # fmt: skip
    figures = {"all": {"f1": 0.5, "hausdorff": None, "confusion": [[1]]}, "hovernet": {"pq": 0.25}, "n_images": 2}
    assert lineage.figure_metrics(figures) == {"test/all/f1": 0.5, "test/hovernet/pq": 0.25, "test/n_images": 2.0}


def test_the_data_version_is_the_md5_dvc_recorded(tmp_path: Path) -> None:
    """A folder added with `dvc add` (a real DVC repository) is known by the md5 of its .dvc file; a folder DVC
    does not track has no DVC version, and its datasets fall back to the content hash."""
    from nucleiseg.synth import write_dataset
    from nucleiseg.tracking import dataset_hash

    write_dataset(tmp_path / "tiles", n_images=2, size=64, seed=0)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "tiles"], cwd=tmp_path, check=True)
    import yaml

    md5 = yaml.safe_load((tmp_path / "tiles.dvc").read_text())["outs"][0]["md5"]
    assert lineage.dvc_md5(tmp_path / "tiles", tmp_path) == (md5, "tiles.dvc")
    assert lineage.dvc_md5("tiles", tmp_path) == (md5, "tiles.dvc")
    shutil.copytree(tmp_path / "tiles", tmp_path / "untracked")
    assert lineage.dvc_md5("untracked", tmp_path) is None

    names = sorted(p.stem for p in (tmp_path / "tiles").glob("*.png") if not p.stem.endswith("_label"))
    sets = lineage.split_datasets(tmp_path / "tiles", {"train": names, "val": [], "test": names[:1]}, tmp_path)
    assert sets.keys() == {"train", "test"}  # an empty split is no dataset
    assert sets["train"].name == "tiles/train" and sets["train"].digest.startswith(md5[:8] + "-")
    assert sets["train"].digest != sets["test"].digest  # same folder, other images
    assert json.loads(sets["test"].to_dict()["profile"]) == {"images": 1, "names": names[:1]}
    untracked = lineage.split_datasets(tmp_path / "untracked", {"train": names}, tmp_path)["train"]
    assert json.loads(untracked.source.to_json())["dvc_md5"] is None
    assert untracked.digest.startswith(dataset_hash(tmp_path / "untracked")[:8] + "-")


@pytest.fixture(scope="module")
def tracked(tiny_prepared: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny tracked training run, its test split scored and reported through the CLI, as the DVC stages do."""
    import mlflow

    root = tmp_path_factory.mktemp("lineage")
    settings = [*TINY_SETTINGS, f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifacts={root}/artifacts",
                f"data.dir={tiny_dataset}", f"data.prepared={tiny_prepared}", f"train.out_dir={root}/models",
                f"eval.out={root}/reports/metrics.json", "train.epochs=1"]  # fmt: skip
    result = train(load_params(None, settings), tiny_prepared, root / "models", progress=False)
    sets = [arg for s in settings for arg in ("--set", s)]
    runner = CliRunner()
    scored = runner.invoke(app, ["score", str(root / "models" / "best.pt"), "--split", "test", *sets])
    assert scored.exit_code == 0, scored.output
    reported = runner.invoke(app, ["report", "--out", str(root / "reports" / "results.md"), "--overlays",
                                   str(root / "none"), *sets])  # fmt: skip
    assert reported.exit_code == 0, reported.output
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return {"root": root, "result": result, "settings": settings, "score_output": scored.output,
            "report_output": reported.output}  # fmt: skip


def test_the_run_has_grouped_metrics_and_its_split_datasets(tracked: dict, tiny_prepared: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(tracked["result"].run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {"train/loss", "train/ce", "train/lr", "val/f1", "val/dice"} <= run.data.metrics.keys()
    assert not [k for k in run.data.metrics if "_" in k.split("/")[0]]  # no flat train_loss / val_f1 left
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    # history.json (DVC plots, Optuna) keeps its flat keys
    history = json.loads((tracked["root"] / "models" / "history.json").read_text())
    assert {"train_loss", "train_ce", "val_f1", "val_dice"} <= history[0].keys()

    splits = read_splits(tiny_prepared / "splits.json")
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs if i.tags}
    assert inputs.keys() == {"training", "validation", "test"}
    for split, context in lineage.CONTEXTS.items():
        dataset = inputs[context]
        assert dataset.name == f"synthetic/{split}" and dataset.source_type == "dvc"
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{8}", dataset.digest)
        assert json.loads(dataset.profile)["names"] == sorted(splits[split])


def test_test_figures_are_metrics_of_the_run_and_the_logged_model(tracked: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    result = tracked["result"]
    run = client.get_run(result.run_id)
    summary = json.loads((tracked["root"] / "reports" / "metrics_summary.json").read_text())
    expected = lineage.figure_metrics(summary)
    assert {"test/all/f1", "test/tumor/pq", "test/n_images", "test/hovernet/pq"} <= expected.keys()
    assert {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    assert "logged to MLflow run " + result.run_id in tracked["score_output"]

    model = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    on_model = {m.key: m for m in model.metrics}
    assert {k: on_model[k].value for k in expected} == pytest.approx(expected)
    assert on_model["test/all/f1"].dataset_name == "synthetic/test"
    assert on_model["val/f1"].dataset_name == "synthetic/val"  # the saved epoch's validation figures
    assert run.data.tags[lineage.CHECKPOINT_TAG] == lineage.checkpoint_digest(tracked["root"] / "models" / "best.pt")
    # the registry's version tags are not where the figures live any more: see tests/test_registry.py


def test_confusion_matrix_and_report_are_run_artifacts(tracked: dict, tmp_path: Path) -> None:
    import mlflow

    run_id = tracked["result"].run_id
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert names == {"evaluation/confusion.png", "evaluation/metrics_summary.json", "evaluation/results.md"}
    png = read_image(client.download_artifacts(run_id, "evaluation/confusion.png", str(tmp_path)))
    assert png.ndim == 3 and png.shape[0] > 200 and png.std() > 20  # drawn, not blank
    report = Path(client.download_artifacts(run_id, "evaluation/results.md", str(tmp_path))).read_text()
    assert report == (tracked["root"] / "reports" / "results.md").read_text()


def test_a_checkpoint_the_run_did_not_log_adds_nothing(tracked: dict) -> None:
    """last.pt sits beside the run id too, but its bytes are not the logged model's: its figures stay out."""
    import mlflow

    run_id = tracked["result"].run_id
    before = mlflow.MlflowClient().get_metric_history(run_id, "test/all/f1")
    sets = [arg for s in tracked["settings"] for arg in ("--set", s)]
    out = tracked["root"] / "other" / "metrics.json"
    scored = CliRunner().invoke(app, ["score", str(tracked["root"] / "models" / "last.pt"), "--out", str(out), *sets])
    assert scored.exit_code == 0, scored.output
    assert "not logged to MLflow" in scored.output and "is not the checkpoint run" in scored.output
    assert mlflow.MlflowClient().get_metric_history(run_id, "test/all/f1") == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_the_mlflow_ui_renders_the_run_in_a_browser(tracked: dict, tmp_path: Path) -> None:
    """scripts/screenshot_mlflow.py: the REST API the UI reads has the grouped names, the datasets and the
    experiment kind, and Chromium draws the pages (not a blank one)."""
    result = tracked["result"]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "screenshot_mlflow.py"), str(tracked["root"] / "mlflow.db"),
         "--run", result.run_id, "--out", str(tmp_path), "--pages", "run", "--checks", str(tmp_path / "c.json")],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads((tmp_path / "c.json").read_text())
    assert checks["experiment_kind"] == "custom_model_development"
    assert {"train/loss", "val/f1", "test/all/f1", "test/hovernet/pq"} <= set(checks["run_metrics"])
    assert set(checks["datasets"]) == {"training", "validation", "test"}
    assert "test/all/f1" in checks["model_metrics"]
    shot = read_image(tmp_path / "mlflow_run.png")
    assert shot.shape[:2] == (1000, 1600)
    # a rendered page has text and widgets: many distinct colours, not a white or single-colour screen
    assert len(np.unique(shot.reshape(-1, shot.shape[-1]), axis=0)) > 50
