"""Retraining when new annotations land: the real flow, DVC, MLflow and pipeline on a tiny preset.

One module-scoped copy of the repository trains on ``data/`` (6 synthetic tiles, versioned by ``dvc add``) and runs
``dvc repro`` once for the first champion; the tests then call the flow in order: nothing new, a broken annotation,
a new annotated tile.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from test_pipeline import TINY, _merge, copy_repository

from nucleiseg.params import load_params


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def annotated_repo(tmp_path_factory: pytest.TempPathFactory, prefect_api: None) -> tuple[Path, dict[str, str]]:
    """A copy of the repository training on ``data/`` (6 tiles, ``dvc add``-ed and committed), with a champion."""
    from prefect.settings import PREFECT_API_URL

    from nucleiseg.synth import write_dataset

    root = tmp_path_factory.mktemp("retrain") / "repo"
    copy_repository(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _merge(params, {**TINY, "data": {**TINY["data"], "dir": "data"}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_dataset(root / "data", 6, 256, seed=0)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "2",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }  # fmt: skip  (the stages' flows use the test server)
    env.pop("MLFLOW_TRACKING_URI", None)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "add", "-q", "data"],
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "c"],
    ):
        done = _run(cmd, root, env)
        assert done.returncode == 0, done.stdout + done.stderr
    # Up to the register stage: the first champion (synth and batch are not needed for it; the flow's repro runs them).
    done = _run(["dvc", "repro", "register"], root, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return root, env


@pytest.fixture
def flow_env(annotated_repo, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The flow runs in this process: give it the environment the repository copy's pipeline expects."""
    root, env = annotated_repo
    for key in ("HF_HUB_OFFLINE", "DVC_NO_ANALYTICS", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def _registry(root: Path) -> dict:
    """The aliases and latest version in the copy's MLflow store, and its registry.json."""
    from nucleiseg.registry import registry_state

    state = registry_state("nucleiseg", tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return {**state, "report": (root / "reports" / "registry.json").read_text()}


def _cli_retrain(root: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from nucleiseg.cli import app

    result = CliRunner().invoke(app, ["retrain", "--repo-dir", str(root)])
    return result.exit_code, result.output


def _retrain(root: Path) -> dict:
    from pipelines.retrain import retrain_on_new_annotations

    return retrain_on_new_annotations(repo_dir=str(root), params_path="params.yaml")


def test_deployment_carries_schedule_and_concurrency_limit():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from pipelines.retrain import DEPLOYMENT_NAME, build_deployment

    settings = load_params(None, ["schedule.cron=30 3 * * 1", "schedule.timezone=Europe/Paris"])
    deployment = build_deployment(settings, REPO, "params.yaml")
    assert deployment.name == DEPLOYMENT_NAME
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 3 * * 1" and schedule.schedule.timezone == "Europe/Paris"
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert deployment.parameters == {"repo_dir": str(REPO), "params_path": "params.yaml"}
    assert deployment.entrypoint == "pipelines.retrain.retrain_on_new_annotations"
    for bad in ("schedule.cron=every night", "schedule.timezone=Mars/Base"):
        with pytest.raises(ValueError):
            build_deployment(load_params(None, [bad]))


@pytest.mark.slow  # shares a module fixture that runs the real pipeline (~3 min on 2 loaded cores)
def test_nothing_new_does_nothing(flow_env):
    root = flow_env
    before, dvc_before = _registry(root), (root / "data.dvc").read_bytes()
    assert before["aliases"]["champion"] == "1"
    summary = _retrain(root)
    assert summary["action"] == "none", summary
    assert summary["champion_before"] == "1" and summary["dataset_hash"] == summary["champion_dataset_hash"]
    code, output = _cli_retrain(root)
    assert code == 0 and "nothing new" in output, output
    assert _registry(root) == before and (root / "data.dvc").read_bytes() == dvc_before


@pytest.mark.slow  # shares a module fixture that runs the real pipeline (~3 min on 2 loaded cores)
def test_broken_annotation_fails_validation_and_changes_nothing(flow_env):
    from nucleiseg.io import write_image
    from nucleiseg.labels import write_label

    root = flow_env
    before, dvc_before = _registry(root), (root / "data.dvc").read_bytes()
    image = np.random.default_rng(0).integers(60, 200, (256, 256, 3), dtype=np.uint8)
    label = np.zeros((128, 128), np.uint16)  # the wrong size for its image
    label[10:20, 10:20] = 3
    write_image(root / "data" / "broken.png", image)
    write_label(root / "data" / "broken_label.png", label)
    try:
        summary = _retrain(root)
        code, output = _cli_retrain(root)
    finally:
        for name in ("broken.png", "broken_label.png"):
            (root / "data" / name).unlink()
    assert summary["action"] == "invalid", summary
    assert any("broken" in f for f in summary["offending_files"]), summary
    assert summary["failures"] and all(f["description"] for f in summary["failures"])
    assert summary["dataset_hash"] != summary["champion_dataset_hash"]
    assert code == 1 and "broken_label.png" in output, output
    assert _registry(root) == before and (root / "data.dvc").read_bytes() == dvc_before


@pytest.mark.slow  # shares a module fixture that runs the real pipeline (~3 min on 2 loaded cores)
def test_new_annotated_image_registers_a_version_and_the_gate_decides(flow_env):
    from nucleiseg.registry import lookup_metric
    from nucleiseg.synth import write_dataset
    from nucleiseg.tracking import dataset_hash

    root = flow_env
    before, dvc_before = _registry(root), (root / "data.dvc").read_bytes()
    write_dataset(root / "data", 1, 256, seed=7, prefix="new")
    summary = _retrain(root)

    assert summary["action"] == "retrained", summary
    dvc_after = yaml.safe_load((root / "data.dvc").read_text())
    assert dvc_after != yaml.safe_load(dvc_before) and dvc_after["outs"][0]["nfiles"] == 14
    assert summary["pushed"] and any((root / ".dvc-remote").rglob("*"))  # the repo's default local remote
    after = _registry(root)
    new_version = str(int(before["latest_version"]) + 1)
    assert after["latest_version"] == summary["version"] == new_version
    registry = json.loads(after["report"])
    assert registry["version"] == new_version and registry["aliases"] == after["aliases"]

    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("nucleiseg", new_version).tags
    assert tags["dataset_hash"] == dataset_hash(root / "data") == summary["dataset_hash"]

    # The gate's verdict agrees with the figures it recorded; the champion moves only when it was promoted.
    decision = registry["decision"]
    assert summary["promoted"] == decision["promoted"]
    assert after["aliases"]["champion"] == (new_version if decision["promoted"] else before["aliases"]["champion"])
    scores = decision["scores"]
    if "champion" in scores:
        metric = load_params(root / "params.yaml").promote.metric
        new, old = scores["challenger"][metric], scores["champion"][metric]
        if new is not None and old is not None and not math.isclose(new, old):
            assert decision["promoted"] == (new > old)
        measured = lookup_metric(json.loads((root / "reports" / "metrics.json").read_text())["summary"], metric)
        assert new is None or math.isclose(new, measured)
    else:  # the split changed with the new tile and the stage has no evaluator: the champion cannot be compared
        assert not decision["promoted"] and "cannot compare" in decision["reason"]

    # The gate has judged these annotations: the next scheduled run does nothing.
    again = _retrain(root)
    assert again["action"] == "none", again
    assert _registry(root) == after
