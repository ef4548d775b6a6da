"""Training on the tiny synthetic set: an MLflow run with everything in it, exact resume, DDP on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SETTINGS
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.params import load_params
from nucleiseg.train import load_checkpoint, train


def _params(tmp_path: Path, *extra: str):
    return load_params(
        None,
        [*TINY_SETTINGS, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifacts={tmp_path}/artifacts",
         *extra],
    )  # fmt: skip


def test_training_leaves_a_complete_mlflow_run(tiny_prepared, tmp_path):
    import mlflow

    from nucleiseg.infer import load_predictor

    params = _params(tmp_path)
    result = train(params, tiny_prepared, tmp_path / "models", progress=False)

    assert result.epochs_run == 2 and len(result.history) == 2
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["model.name"] == "resunet34"
    assert run.data.tags["encoder_pretrained"] == "false"  # weights 'none' here; offline imagenet falls back too
    assert len(run.data.tags["dataset_hash"]) == 16 and run.data.tags["params_hash"] == params.digest()
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2] and all(m.value > 0 for m in losses)
    assert client.get_metric_history(result.run_id, "val_f1")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"learning_curves.png", "history.json", "overlays"} <= artifacts

    # The logged model loads by URI and runs on any tile size (not fixed to the example's shape).
    model = mlflow.pytorch.load_model(result.model_uri)
    assert model(torch.zeros(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    predictor = load_predictor(result.model_uri, device="cpu")
    assert predictor.mean == pytest.approx(load_checkpoint(tmp_path / "models" / "best.pt")["norm_mean"])

    # Checkpoints load with weights_only=True and rebuild a predictor.
    ckpt = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"optimizer", "rng", "state_dict", "best_score"}
    label = load_predictor(tmp_path / "models" / "best.pt", device="cpu").label(
        __import__("numpy").full((100, 130, 3), 200, dtype="uint8")
    )
    assert label.shape == (100, 130)


class _Killed(Exception):
    pass


def _kill_after_first_epoch(epoch: int, metrics: dict) -> None:
    if epoch == 1:
        raise _Killed


def test_resume_reaches_the_uninterrupted_result(tiny_prepared, tmp_path):
    params = _params(tmp_path, "train.deterministic=true", "train.epochs=3")
    train(params, tiny_prepared, tmp_path / "straight", track=False, progress=False)

    with pytest.raises(_Killed):
        train(params, tiny_prepared, tmp_path / "killed", track=False, progress=False,
              epoch_callback=_kill_after_first_epoch)  # fmt: skip
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 0
    resumed = train(params, tiny_prepared, tmp_path / "killed", resume=True, track=False, progress=False)
    assert resumed.epochs_run == 2

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    # Bit for bit: a deterministic CPU run is exactly reproducible, and resume restores every state.
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.name=segformer", "model.name"), ("train.beta=-1", "train.beta"), ("augmentation.crop=320", "crop")],
)
def test_bad_settings_stop_before_any_work(tmp_path, override, key):
    result = CliRunner().invoke(app, ["train", "--params", str(REPO / "params.yaml"), "--set", override,
                                      "--prepared", str(tmp_path / "none")])  # fmt: skip
    assert result.exit_code == 2
    assert key in result.output
    assert not (tmp_path / "none").exists()


def test_resume_without_a_checkpoint_is_an_error(tiny_prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"last\.pt"):
        train(_params(tmp_path), tiny_prepared, tmp_path / "empty", resume=True, track=False, progress=False)


@pytest.mark.slow
def test_distributed_data_parallel_on_cpu(tiny_prepared, tmp_path):
    """torchrun with 2 gloo processes: both train, rank 0 alone writes the checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    sets = [arg for s in [*TINY_SETTINGS, "train.threads=1", "train.epochs=1"] for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "nucleiseg", "train", "--params", str(REPO / "params.yaml"), *sets,
           "--prepared", str(tiny_prepared), "--out", str(tmp_path / "ddp"), "--no-track"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["epoch"] == 0 and not any(k.startswith("module.") for k in ckpt["state_dict"])
