"""Optuna tuning on the tiny synthetic set: nested MLflow runs, best settings, --apply, pruning, shared studies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, TINY_SETTINGS
from optuna.trial import TrialState
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.params import load_params
from nucleiseg.presets import set_yaml_values
from nucleiseg.tuning import (
    OVERRIDES_ATTR,
    PARENT_RUN_ATTR,
    SearchSpace,
    TuningError,
    open_storage,
    open_study,
    run_tuning,
)

# A trial of a few seconds: the small U-Net, 2 epochs of 1 step on 64x64 crops, validated on the one
# validation tile in 4 tiles. The tuning logic does not depend on the architecture.
FAST = [*TINY_SETTINGS, "model.name=unet", "train.steps_per_epoch=1", "augmentation.crop=64", "tune.epochs=2",
        "infer.tile=128", "infer.overlap=0"]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store for the module (creating its SQLite schema costs seconds)."""
    from nucleiseg.tuning import configure_tracking

    tmp = tmp_path_factory.mktemp("mlflow")
    configure_tracking(load_params(None, _tracking(tmp)))
    return tmp


def _tracking(store: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifacts={store}/artifacts"]


def _settings(store: Path, tmp: Path, *extra: str) -> list[str]:
    return [*FAST, *_tracking(store), f"tune.storage=sqlite:///{tmp}/optuna.db", *extra]


@pytest.fixture(scope="module")
def study_run(tiny_prepared, store, tmp_path_factory):
    """Three trials of one study, tracked in MLflow (the median pruner needs 5 trials before it prunes)."""
    tmp = tmp_path_factory.mktemp("tune")
    params = load_params(None, _settings(store, tmp, "tune.study=demo", "tune.seed=3"))
    summary = run_tuning(params, tiny_prepared, n_trials=3, best_out=tmp / "reports" / "best_params.yaml")
    return tmp, params, summary


def test_every_trial_is_a_nested_run_with_its_curve_and_score(study_run):
    import mlflow

    _, params, summary = study_run
    study = optuna.load_study(study_name="demo", storage=params.tune.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert summary.trials_here == [0, 1, 2] and summary.n_complete == 3

    client = mlflow.MlflowClient()
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tune-demo"
    assert study.user_attrs[PARENT_RUN_ATTR] == parent.info.run_id
    assert parent.data.params["tune.objective"] == "f1" and parent.data.params["tune.w0"] == "[1.0, 20.0]"

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", order_by=["start_time"]
    )
    assert len(children) == 3
    for trial, run in zip(study.trials, sorted(children, key=lambda r: int(r.data.tags["optuna.trial_number"])),
                          strict=True):  # fmt: skip
        applied = trial.user_attrs[OVERRIDES_ATTR]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["loss.w0"]) == pytest.approx(applied["loss.w0"])
        assert float(run.data.params["train.beta"]) == pytest.approx(applied["train.beta"])
        assert run.data.params["train.epochs"] == "2"  # tune.epochs replaces train.epochs
        curve = client.get_metric_history(run.info.run_id, "val/f1")
        assert [m.step for m in curve] == [1, 2]
        # The final score is the best validated epoch's figure, and it is what Optuna optimises.
        assert run.data.metrics["best_val_f1"] == pytest.approx(max(m.value for m in curve))
        assert trial.value == pytest.approx(run.data.metrics["best_val_f1"])
        assert trial.intermediate_values == {m.step: pytest.approx(m.value) for m in curve}


def test_parent_holds_best_params_history_and_importance(study_run):
    import mlflow

    tmp, params, summary = study_run
    study = optuna.load_study(study_name="demo", storage=params.tune.storage)
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"best_params.yaml", "trials.csv", "optimization_history.png", "intermediate_values.png"} <= artifacts
    if len({t.value for t in study.trials}) > 1:
        assert "param_importances.png" in artifacts
    else:  # three identical scores: importance is undefined, and the run says so instead of failing
        assert "not drawn" in client.get_run(summary.parent_run_id).data.tags["plot.param_importances"]
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.metrics["best_val_f1"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)

    doc = yaml.safe_load((tmp / "reports" / "best_params.yaml").read_text())
    assert doc["value"] == pytest.approx(study.best_value) and doc["trial"] == study.best_trial.number
    assert doc["params"] == pytest.approx(study.best_trial.user_attrs[OVERRIDES_ATTR])
    assert set(doc["params"]) == {"train.beta", "loss.w0", "loss.sigma"}
    assert doc["trials"] == {"complete": 3, "pruned": 0, "failed": 0}


def test_apply_updates_only_the_tuned_lines_of_params_yaml(study_run, tmp_path):
    tmp, _, _ = study_run
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    original = target.read_text()
    best = tmp / "reports" / "best_params.yaml"
    values = yaml.safe_load(best.read_text())["params"]

    result = CliRunner().invoke(app, ["tune", "--apply", "--params", str(target), "--best", str(best)])

    assert result.exit_code == 0, result.output
    assert "loss.w0: 10.0 ->" in result.output
    applied = load_params(target)  # still a valid params file
    assert applied.loss.w0 == pytest.approx(values["loss.w0"])
    assert applied.loss.sigma == pytest.approx(values["loss.sigma"])
    assert applied.train.beta == pytest.approx(values["train.beta"])
    before, after = original.splitlines(), target.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    flat = load_params(REPO / "params.yaml").flat()
    moved = {key.rsplit(".", 1)[1] for key, value in values.items() if float(value) != float(flat[key])}
    assert {"w0", "sigma"} <= moved  # drawn from continuous ranges; beta may stay 0 (the perceptual term off)
    assert len(changed) == len(moved) and {b.split(":")[0].strip() for _, b in changed} == moved
    for old, new in changed:  # the comment after the value is kept, at the same column when it fits
        if "#" in old:
            assert new.endswith(old[old.index("#") :])
    assert applied.model_dump(exclude={"loss", "train"}) == load_params(REPO / "params.yaml").model_dump(
        exclude={"loss", "train"}
    )


def test_apply_refuses_an_invalid_result_and_keeps_the_file(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    original = target.read_bytes()
    best = tmp_path / "best_params.yaml"
    best.write_text(yaml.safe_dump({"params": {"loss.sigma": -1.0}}))

    result = CliRunner().invoke(app, ["tune", "--apply", "--params", str(target), "--best", str(best)])

    assert result.exit_code == 1
    assert "loss.sigma" in result.output and "left unchanged" in result.output
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_params.yaml", "params.yaml"]  # no temp file left


def test_set_yaml_values_inserts_missing_keys_and_keeps_comments():
    text = "# settings\nloss:\n  w0: 10.0   # eq. 2\ntrain:\n  epochs: 3  # short\n"
    out = set_yaml_values(text, {"loss.w0": 2.5, "loss.sigma": 4.0, "train.beta": 0.0})
    assert yaml.safe_load(out) == {"loss": {"w0": 2.5, "sigma": 4.0}, "train": {"epochs": 3, "beta": 0.0}}
    assert "# settings" in out and "w0: 2.5    # eq. 2" in out and "epochs: 3  # short" in out


def test_pruned_trials_are_recorded_and_leave_no_best_params(tiny_prepared, store, tmp_path):
    """A pruner that prunes every reported value: the trial stops after its first validated epoch.

    The study lives in an Optuna journal file here (the other storage kind)."""
    import mlflow

    params = load_params(None, [*_settings(store, tmp_path, "tune.study=pruned"),
                                f"tune.storage={tmp_path}/optuna.journal"])  # fmt: skip
    pruner = optuna.pruners.ThresholdPruner(lower=2.0)  # no F1 reaches 2
    summary = run_tuning(params, tiny_prepared, n_trials=1, best_out=tmp_path / "best.yaml", pruner=pruner)

    study = optuna.load_study(study_name="pruned", storage=open_storage(params.tune.storage))
    assert [t.state for t in study.trials] == [TrialState.PRUNED]
    assert study.trials[0].last_step == 1  # stopped at epoch 1 of 2
    assert summary.n_pruned == 1 and summary.best_params is None
    assert not (tmp_path / "best.yaml").exists()
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("nucleiseg").experiment_id],
        f"tags.mlflow.parentRunId = '{summary.parent_run_id}'",
    )
    assert len(runs) == 1
    for run in runs:
        assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/f1")] == [1]


def test_the_default_pruner_is_median_on_epochs():
    from nucleiseg.tuning import make_pruner

    pruner = make_pruner(startup_trials=3, warmup_epochs=2)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_startup_trials == 3 and pruner._n_warmup_steps == 3  # first prunable epoch: 3


def test_search_space_switches_the_perceptual_loss_off_exactly():
    space = SearchSpace(beta=(0.0, 1.0), w0=(1.0, 20.0), sigma=(5.0, 5.0))
    assert space.suggest(optuna.trial.FixedTrial({"perceptual": False, "w0": 3.0, "sigma": 5.0})) == {
        "train.beta": 0.0, "loss.w0": 3.0, "loss.sigma": 5.0}  # fmt: skip
    on = space.suggest(optuna.trial.FixedTrial({"perceptual": True, "beta": 0.25, "w0": 3.0, "sigma": 5.0}))
    assert on["train.beta"] == 0.25
    # A range that excludes 0 has no switch.
    fixed = SearchSpace(beta=(0.1, 0.1)).suggest(optuna.trial.FixedTrial({"beta": 0.1, "w0": 2.0, "sigma": 2.0}))
    assert fixed["train.beta"] == 0.1
    with pytest.raises(ValueError, match="empty"):
        SearchSpace(w0=(5.0, 1.0))


def test_search_space_draws_the_watershed_thresholds_only_when_given():
    space = SearchSpace(beta=(0.0, 0.0), marker_threshold=(0.0, 0.6), mask_threshold=(0.3, 0.7))
    drawn = space.suggest(optuna.trial.FixedTrial({"beta": 0.0, "w0": 2.0, "sigma": 2.0,
                                                   "marker_threshold": 0.2, "mask_threshold": 0.45}))  # fmt: skip
    assert drawn["post.marker_threshold"] == 0.2 and drawn["post.mask_threshold"] == 0.45
    assert "marker_threshold" in space.as_dict() and "marker_threshold" not in SearchSpace().as_dict()
    with pytest.raises(ValueError, match="marker_threshold"):
        SearchSpace(marker_threshold=(0.6, 0.1))


def test_joining_a_study_made_for_another_objective_is_an_error(tmp_path):
    storage = str(tmp_path / "study.journal")
    space = SearchSpace()
    _, created, seed = open_study(storage, "s", "f1", seed=0, space=space)
    assert created and seed == 0
    _, created, seed = open_study(storage, "s", "f1", seed=0, space=space)
    assert not created and seed != 0  # a joining worker samples with its own seed
    with pytest.raises(TuningError, match="optimises f1, not hausdorff"):
        open_study(storage, "s", "hausdorff", seed=0, space=space)
    with pytest.raises(TuningError, match=r"\.log or \.journal"):
        open_storage(str(tmp_path / "study.txt"))


@pytest.mark.slow  # two fresh interpreters importing torch, MLflow and Prefect
def test_two_tune_processes_share_one_study(tiny_prepared, store, tmp_path):
    """Two `nucleiseg tune --n-trials 1` started together on one SQLite storage: one study of two trials."""
    import mlflow
    from prefect.settings import PREFECT_API_URL

    sets = _settings(store, tmp_path, "tune.study=shared", "train.threads=1", "tune.epochs=1", "tune.beta=[0, 0]")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("{}\n")
    args = [sys.executable, "-m", "nucleiseg", "tune", "--n-trials", "1", "--params", str(params_file),
            "--prepared", str(tiny_prepared), "--best", str(tmp_path / "best.yaml")]  # fmt: skip
    args += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    workers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]  # fmt: skip
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 2 and {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["sampler_seed"] for t in study.trials}) == 2  # one seed per worker
    parent = study.user_attrs[PARENT_RUN_ATTR]
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("nucleiseg").experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == ["0", "1"]  # one parent for both
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["trials"]["complete"] in (1, 2)
