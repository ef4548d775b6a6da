"""The real DVC pipeline (`dvc repro`) on a tiny preset, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

TINY = {
    "data": {"synth": {"n_images": 6, "size": 256}},
    "patches": {"size": 128, "grid": 2},
    "augmentation": {"crop": 96},
    "model": {"encoder_weights": "none"},
    "loss": {"vgg_weights": "none"},
    "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "num_workers": 0},
    "infer": {"tile": 96, "overlap": 32, "batch_size": 4},
}


def _merge(tree: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        else:
            tree[key] = value


def copy_repository(root: Path) -> None:
    """Copy the files git tracks in this repository (as they are in the working tree) into ``root``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The committed files (and pending edits) of this repository, with a tiny params preset, after `dvc repro`."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    copy_repository(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _merge(params, TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "2"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    done = _run(["dvc", "repro"], root, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return root, env


def test_repro_runs_every_stage(repo_copy):
    root, _ = repo_copy
    summary = json.loads((root / "reports" / "metrics_summary.json").read_text())
    assert set(summary["all"]) >= {"f1", "dice", "hausdorff", "aji", "pq"} and summary["n_images"] >= 1
    assert json.loads((root / "models" / "train_summary.json").read_text())["epochs"] == 1
    registry = json.loads((root / "reports" / "registry.json").read_text())
    assert registry["aliases"]["champion"] == registry["version"] == "1"
    splits = json.loads((root / "prepared" / "splits.json").read_text())
    batch = json.loads((root / "predictions" / "batch" / "batch_summary.json").read_text())
    assert batch["ok"] == len(splits["test"]) and batch["failed"] == 0
    for name in splits["test"]:
        assert (root / "predictions" / "batch" / f"{name}.geojson").is_file()
        assert (root / "reports" / "overlays" / f"{name}.png").is_file()
    assert (root / "mlruns" / "mlflow.db").is_file()


def test_second_repro_is_a_no_op(repo_copy):
    root, env = repo_copy
    done = _run(["dvc", "repro"], root, env)
    assert done.returncode == 0
    assert "Data and pipelines are up to date" in done.stdout
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], root, env).stdout.splitlines()
    # Only DVC's lock file and the uncached metrics, plots and report (meant for git) may be new.
    expected = ("dvc.lock", "registry.json", ".json", ".png", "results.md")
    assert [line for line in status if not line.endswith(expected)] == []


def test_metrics_and_plots_show(repo_copy, tmp_path):
    root, env = repo_copy
    metrics = _run(["dvc", "metrics", "show"], root, env)
    assert metrics.returncode == 0 and "all.f1" in metrics.stdout
    plots = _run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root, env)
    assert plots.returncode == 0, plots.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "confusion" in html and "history.json" in html


def test_after_a_run_dvc_status_is_clean_and_pull_succeeds(repo_copy):
    """As after `make demo`: data.dvc pulled from the committed remote objects, every output in the cache."""
    root, env = repo_copy
    assert _run(["dvc", "pull", "-q", "data.dvc"], root, env).returncode == 0  # make demo's first step
    status = _run(["dvc", "status"], root, env)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
    pulled = _run(["dvc", "pull"], root, env)
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]


def test_the_training_run_shows_the_pipelines_data_and_test_figures_in_mlflow(repo_copy):
    """After `dvc repro`: the run's datasets carry the md5 dvc.lock records for data.dir, the evaluate stage's
    figures are metrics of the run and its logged model, the report stage's report is an artifact, and the
    registered version keeps only the figures the gate compares (nucleiseg.lineage, nucleiseg.registry)."""
    import mlflow

    from nucleiseg.lineage import figure_metrics

    root, _ = repo_copy
    data_dir = yaml.safe_load((root / "params.yaml").read_text())["data"]["dir"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == data_dir)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db", f"sqlite:///{root}/mlruns/mlflow.db")
    run = client.get_run((root / "models" / "mlflow_run_id").read_text().strip())
    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests.keys() == {f"{data_dir}/train", f"{data_dir}/val", f"{data_dir}/test"}
    assert all(d.startswith(md5[:8] + "-") for d in digests.values())

    expected = figure_metrics(json.loads((root / "reports" / "metrics_summary.json").read_text()))
    assert "test/all/f1" in expected and {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    model = client.get_logged_model((root / "models" / "model_uri").read_text().strip().removeprefix("models:/"))
    assert expected.keys() <= {m.key for m in model.metrics}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/results.md"} <= artifacts

    registry = json.loads((root / "reports" / "registry.json").read_text())
    version = client.get_model_version(registry["model_name"], registry["version"])
    assert {k for k in version.tags if k.startswith("test.")} == {"test.all.f1", "test.all.dice"}
