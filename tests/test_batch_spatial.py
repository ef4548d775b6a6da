"""The batch flow's spatial reports, run for real (temporary Prefect API, real checkpoint, real MLflow store):
one report per image, logged to the MLflow run the batch runs under, redone only when needed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from test_batch_inference import _one_thread, by_name, run_batch, workspace  # noqa: F401  (fixtures)

from nucleiseg.spatial_report import report_paths


def test_batch_writes_a_spatial_report_per_image_and_logs_them_to_the_active_run(
    prefect_api: None,
    workspace: dict[str, Path],  # noqa: F811
) -> None:
    import mlflow

    params = workspace["params"]
    params.write_text(params.read_text() + "spatial: {simulations: 5, permutations: 9, r_steps: 10}\n")
    mlflow.set_tracking_uri(f"sqlite:///{workspace['out'].parent / 'runs.db'}")
    experiment = mlflow.create_experiment("batch", artifact_location=str(workspace["out"].parent / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        code, output, summary = run_batch(workspace)
    assert code == 1 and "corrupt.png" in output  # the corrupt image fails alone, as without reports
    results = by_name(summary)
    nuclei = 0
    for name in ("a", "b"):
        paths = report_paths(workspace["out"], name)
        assert results[f"{name}.png"]["spatial_report"] == {key: str(path) for key, path in paths.items()}
        figures = json.loads(paths["json"].read_text())
        table = pd.read_csv(workspace["out"] / f"{name}_nuclei.csv")
        assert figures["nuclei"] == len(table) and figures["settings"]["simulations"] == 5
        assert table["class_probability"].between(1 / 3, 1).all(), "the class is the most probable of the three"
        nuclei += len(table)
        assert "data:image/png;base64," in paths["html"].read_text()
    assert nuclei > 0
    assert "corrupt_spatial.json" not in {p.name for p in workspace["out"].iterdir()}
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "spatial")}
    assert logged == {f"spatial/{n}_spatial.{e}" for n in ("a", "b") for e in ("html", "json")}

    # A rerun skips the images and keeps their reports; other spatial settings redo the reports only.
    before = report_paths(workspace["out"], "a")["html"].stat().st_mtime_ns
    code, _, summary = run_batch(workspace)
    assert by_name(summary)["a.png"]["status"] == "skipped"
    assert report_paths(workspace["out"], "a")["html"].stat().st_mtime_ns == before
    code, _, summary = run_batch(workspace, "--set", "spatial.grid_um=50")
    assert by_name(summary)["a.png"]["status"] == "skipped"
    assert json.loads(report_paths(workspace["out"], "a")["json"].read_text())["settings"]["grid_um"] == 50
