"""Training on the tiny synthetic set: an MLflow run with everything in it, exact resume, DDP on CPU."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_SETTINGS
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.data import class_weights, target_frequencies
from nucleiseg.params import load_params
from nucleiseg.train import load_checkpoint, lr_scheduler, train


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
    losses = client.get_metric_history(result.run_id, "train/loss")  # grouped by "/" (nucleiseg.lineage)
    assert [m.step for m in losses] == [1, 2] and all(m.value > 0 for m in losses)
    assert client.get_metric_history(result.run_id, "val/f1")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"learning_curves.png", "history.json", "overlays"} <= artifacts

    # The logged model is the pyfunc model of nucleiseg.mlflow_model (safetensors weights, no pickle), which
    # load_predictor reads as the checkpoint it was saved from.
    assert mlflow.models.get_model_info(result.model_uri).flavors.keys() == {"python_function"}
    predictor = load_predictor(result.model_uri, device="cpu")
    assert all(
        torch.equal(t, predictor.model.state_dict()[k])
        for k, t in load_checkpoint(tmp_path / "models" / "best.pt")["state_dict"].items()
    )
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
    # A one-cycle schedule and balanced class weights: the scheduler's state must resume too.
    params = _params(tmp_path, "train.deterministic=true", "train.epochs=3", "train.schedule=onecycle",
                     "loss.class_weights=balanced")  # fmt: skip
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
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * 2  # epochs x steps


def test_select_last_keeps_the_end_of_the_schedule(tiny_prepared, tmp_path):
    params = _params(tmp_path, "train.epochs=2", "train.select=last", "train.val_every=1")
    result = train(params, tiny_prepared, tmp_path / "run", track=False, progress=False)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert best["epoch"] == last["epoch"] == 1 and result.best_epoch == 2
    for key, tensor in last["state_dict"].items():
        assert torch.equal(tensor, best["state_dict"][key]), key


def test_one_cycle_warms_up_to_the_peak_then_anneals():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = lr_scheduler(opt, "onecycle", 2e-3, total_steps=100, warmup=0.2)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(2e-3 / 25)
    assert max(rates) == pytest.approx(2e-3, rel=1e-3) and int(np.argmax(rates)) in (19, 20)
    assert rates[-1] < 2e-5 and all(a >= b for a, b in itertools.pairwise(rates[20:]))


def test_cosine_warms_up_linearly_then_decays_to_zero():
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = lr_scheduler(opt, "cosine", 1e-3, total_steps=10, warmup=0.2)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert rates[-1] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))
    assert lr_scheduler(opt, "constant", 1e-3, 10, 0.1) is None


def test_balanced_class_weights_favour_rare_classes_and_keep_the_loss_scale():
    freq = np.array([0.7, 0.1, 0.05, 0.05, 0.1])
    w = class_weights(freq)
    assert float((freq * w).sum()) == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx((0.7 / 0.05) ** 0.5, rel=1e-5)
    absent = class_weights([0.8, 0.2, 0.0, 0.0, 0.0])
    assert absent[2] == absent[3] == absent[4] == absent[1]  # an absent class gets the largest other weight


def test_target_frequencies_count_the_training_targets(tiny_prepared):
    from nucleiseg.data import list_patches
    from nucleiseg.labels import read_label, targets

    labels = [label for _, label, _ in list_patches(tiny_prepared / "patches" / "train")]
    freq = target_frequencies(labels)
    direct = np.bincount(np.concatenate([targets(read_label(p)).ravel() for p in labels]), minlength=5)
    assert freq == pytest.approx(direct / direct.sum())


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
