"""The paper's ablation on the tiny synthetic set: five tagged MLflow runs and the Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS
from typer.testing import CliRunner

from nucleiseg.ablation import PAPER, ROW_KEYS, render_report, row_overrides, row_params
from nucleiseg.cli import app
from nucleiseg.params import load_params

# One optimizer step per row on 64x64 crops; validation and test tiles in 4 tiles of 128.
RUN_ROWS = ["unet", "no_perceptual", "full"]
BUDGET = [*TINY_SETTINGS, "train.steps_per_epoch=1", "augmentation.crop=64", "infer.tile=128", "infer.overlap=0"]


@pytest.fixture(scope="module")
def ablation_run(tiny_prepared, tiny_dataset, tmp_path_factory):
    """The Prefect flow over three of the five rows, 1 epoch each, tracked in a fresh MLflow store.

    FCN-8s (134M parameters) and the no-pretrained row (identical to the full method offline) are left out
    to keep the suite's time; their configurations are checked below and their models in test_models.py."""
    from pipelines.ablation import ablation_from_params

    tmp = tmp_path_factory.mktemp("ablation")
    params = load_params(None, [*BUDGET, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                                f"tracking.artifacts={tmp}/artifacts"])  # fmt: skip
    outcome = ablation_from_params(
        params, tiny_prepared, tiny_dataset, tmp / "models", tmp / "reports" / "ablation.md", epochs=1, rows=RUN_ROWS
    )
    return tmp, params, outcome


@pytest.mark.slow  # three real trainings
def test_every_row_is_an_mlflow_run_tagged_ablation(ablation_run):
    import mlflow

    _, _, outcome = ablation_run
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name("nucleiseg").experiment_id
    runs = client.search_runs([experiment], f"tags.ablation = '{outcome['ablation_id']}'")
    assert sorted(r.data.tags["ablation.row"] for r in runs) == sorted(RUN_ROWS)
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"ablation.md", "ablation.json"}
    by_row = {r.data.tags["ablation.row"]: r for r in runs}
    for key, run in by_row.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.epochs"] == "1" and run.data.params["train.seed"] == "0"  # same budget
        assert "test/all/f1" in run.data.metrics and "train/loss" in run.data.metrics
        row = next(r for r in outcome["rows"] if r["key"] == key)
        assert run.data.metrics["test/all/f1"] == pytest.approx(row["test"]["all"]["f1"])
    assert by_row["unet"].data.params["model.name"] == "unet"
    assert by_row["no_perceptual"].data.params["train.beta"] == "0.0"
    assert by_row["full"].data.params["model.encoder_weights"] == "imagenet"  # asked for, even offline
    assert float(by_row["full"].data.params["train.beta"]) > 0
    # Offline, the ImageNet weights fall back to random init, and the run says so.
    assert by_row["full"].data.tags["encoder_pretrained"] == "false"


@pytest.mark.slow
def test_report_has_both_tables_beside_the_papers_figures(ablation_run):
    tmp, _, outcome = ablation_run
    report = (tmp / "reports" / "ablation.md").read_text()
    assert "## Table 1: segmentation" in report and "## Table 2: classification accuracy" in report
    table1 = report.split("## Table 1")[1].split("## Table 2")[0]
    table2 = report.split("## Table 2")[1].split("## Configurations")[0]
    for label in ("U-Net", "ResUNet34 w/o perceptual loss", "Full method (ResUNet34)"):
        assert f"| {label} | this run |" in table1 and f"| {label} | this run |" in table2
    # Table 1 columns: F1, Dice, Hausdorff for all nuclei and each class; the paper's row after each method.
    assert table1.count("F1 | Dice | Haus.") == 4 and table1.count("|  | paper |") == len(RUN_ROWS)
    full_paper = table1.split("| Full method (ResUNet34) | this run |")[1].splitlines()[1]
    assert "| 0.886 | 0.876 | 4.14 |" in full_paper
    assert "84.75%" in table2.split("| Full method (ResUNet34) | this run |")[1].splitlines()[1]
    # Rows without a citable published figure say so rather than inventing one.
    unet_paper = table1.split("| U-Net | this run |")[1].splitlines()[1]
    assert set(c.strip() for c in unet_paper.split("|")[3:-1]) == {"—"}
    # Our figures are the ones scored on the test split.
    full = next(r for r in outcome["rows"] if r["key"] == "full")
    f1 = full["test"]["all"]["f1"]
    assert f"| Full method (ResUNet34) | this run | {'n/a' if f1 is None else f'{f1:.3f}'} |" in table1
    # The budget and the offline caveat are stated.
    assert "1 epoch(s) x 1 step(s) of batch 2 (64x64 crops)" in report
    assert "so its encoder started from random weights" in report and "Machine:" in report
    figures = json.loads((tmp / "reports" / "ablation.json").read_text())
    assert [r["key"] for r in figures["rows"]] == RUN_ROWS
    assert all(r["encoder_pretrained"] is False for r in figures["rows"] if r["model"] != "unet")


@pytest.mark.slow
def test_a_failing_row_does_not_lose_the_others(ablation_run, tiny_prepared, tiny_dataset, tmp_path):
    """Encoder weights from a missing file: the full method cannot start, U-Net (no encoder weights) still runs."""
    import mlflow

    from nucleiseg.ablation import AblationError
    from pipelines.ablation import ablation_from_params

    _, params, _ = ablation_run
    missing = tmp_path / "missing.pt"
    params = load_params(None, [*BUDGET, f"tracking.uri={params.tracking.uri}",
                                f"tracking.artifacts={params.tracking.artifacts}",
                                f"model.encoder_weights={missing}"])  # fmt: skip
    report = tmp_path / "ablation.md"
    with pytest.raises(AblationError, match=r"row\(s\) full failed"):
        ablation_from_params(params, tiny_prepared, tiny_dataset, tmp_path / "models", report, epochs=1,
                             rows=["unet", "full"])  # fmt: skip

    figures = json.loads(report.with_suffix(".json").read_text())
    unet, full = figures["rows"]
    assert unet["key"] == "unet" and "test" in unet and "error" not in unet
    assert full["key"] == "full" and "missing.pt" in full["error"]
    text = report.read_text()
    assert "| Full method (ResUNet34) | this run | failed |" in text and "| U-Net | this run | 0" in text
    parent = mlflow.MlflowClient().get_run(figures["parent_run_id"])
    assert parent.info.status == "FAILED"


def test_each_ablation_differs_from_the_full_method_in_one_setting():
    base = load_params(None, ["train.beta=0", "model.encoder_weights=none", "model.name=unet"])
    full = row_overrides(base, "full")
    # The full method always has the perceptual term and asks for a pretrained encoder.
    assert full == {"model.name": "resunet34", "train.beta": 0.1, "model.encoder_weights": "imagenet"}
    for key in ROW_KEYS:
        changed = {k for k, v in row_overrides(base, key).items() if full[k] != v}
        assert len(changed) == (0 if key == "full" else 1), key
    assert row_params(base, "unet", epochs=7).train.epochs == 7
    assert set(PAPER) <= set(ROW_KEYS)


def test_a_failed_row_is_reported_not_invented():
    rows = [{"key": "fcn8s", "label": "FCN-8s", "error": "RuntimeError: out of memory", "seconds": 0.0}]
    budget = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "crop": 64, "optimizer_steps": 1,
              "samples_seen": 2, "train_images": 4, "train_patches": 16, "val_images": 1, "test_images": 1,
              "seed": 0, "lr": 1e-4}  # fmt: skip
    machine = {"platform": "Linux", "cpu": "cpu", "cpu_count": 2, "torch": "2", "torch_threads": 2, "gpu": None}
    meta = {"ablation_id": "a", "prepared_dir": "p", "data_dir": "d", "test_names": ["t"], "finished": "now"}
    report = render_report(rows, budget, machine, meta)
    assert "| FCN-8s | this run | failed |" in report and "failed: RuntimeError: out of memory" in report


def test_ablate_rejects_an_unknown_row_before_any_work(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(app, ["ablate", "--params", str(params), "--row", "segformer", "--report",
                                      str(tmp_path / "ablation.md")])  # fmt: skip
    assert result.exit_code == 2
    assert "unknown row(s) segformer" in result.output and "no_perceptual" in result.output
    assert not (tmp_path / "ablation.md").exists()
