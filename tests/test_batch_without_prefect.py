"""``nucleiseg batch`` without a Prefect API (no temporary server), its progress bars, and what the inference
commands leave in the working directory when run outside a project (nothing but their outputs).

Real parts: the ``nucleiseg`` command in its own process (an empty working directory, no Prefect API in its
environment), a real MLflow SQLite registry, a real Prefect flow run against the session's test API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, TINY_INFER, TINY_MODEL_KWARGS, write_tiny_checkpoint
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.export import output_paths
from nucleiseg.io import write_image
from nucleiseg.outputs import RECORD_NAME
from nucleiseg.synth import synth_tile

# A rich progress line: "images ━━━━ 2/2 0:00:01 eta 0:00:00" (description, bar, count, elapsed, eta).
PROGRESS_LINE = re.compile(r"images\s.*\b2/2\b.*\d:\d\d:\d\d eta \d:\d\d:\d\d")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences (colours, cursor moves)


def drawn_progress(stderr: str) -> bool:
    """Whether ``stderr`` holds a finished progress line over the 2 images, with elapsed time and ETA."""
    return PROGRESS_LINE.search(ANSI.sub("", stderr)) is not None


def tiles(folder: Path, n: int = 2, size: int = 96) -> Path:
    for k in range(n):
        write_image(folder / f"tile_{k}.png", synth_tile(k, size)[0])
    return folder


def nucleiseg(*args: str | Path, cwd: Path, env: dict[str, str]) -> tuple[int, str, str, list[str]]:
    """``python -m nucleiseg ARGS`` in ``cwd``: (exit code, stdout, stderr, command lines of the child processes
    seen while it ran, sampled every 50 ms)."""
    run = subprocess.Popen(
        [sys.executable, "-m", "nucleiseg", *map(str, args)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    parent = psutil.Process(run.pid)
    children: set[str] = set()
    while run.poll() is None:
        try:
            children |= {" ".join(p.cmdline()) for p in parent.children(recursive=True)}
        except psutil.Error:  # a child that ended between listing and reading
            pass
        time.sleep(0.05)
    out, err = run.communicate()
    return run.returncode, out, err, sorted(children)


@pytest.fixture()
def outside(tmp_path: Path) -> dict[str, Path]:
    """An empty working directory outside any project, with the inputs and a checkpoint elsewhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return {"cwd": cwd, "images": tiles(tmp_path / "images"), "model": write_tiny_checkpoint(tmp_path / "model.pt")}


def bare_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with no Prefect API and no MLflow store configured (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home")}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
    return env


def expected_outputs(names: list[str]) -> set[str]:
    files = {p.name for n in names for p in output_paths(Path("."), n).values()}
    files |= {f"{n}_spatial.{ext}" for n in names for ext in ("html", "json")}
    return files | {"batch_summary.json", RECORD_NAME}


def test_batch_without_a_prefect_api_starts_no_server_and_leaves_only_its_outputs(
    outside: dict[str, Path], tmp_path: Path
) -> None:
    env = bare_env(tmp_path)
    args = ("batch", outside["images"], "out", "--model", outside["model"], "--device", "cpu", "--workers", "2")
    code, out, err, children = nucleiseg(*args, "--progress", cwd=outside["cwd"], env=env)
    assert code == 0, err[-3000:]
    assert children == []  # no Prefect API server (or anything else) was started
    summary = json.loads((outside["cwd"] / "out" / "batch_summary.json").read_text())
    assert summary["orchestrated"] is False and summary["flow_run_id"] is None
    assert summary["ok"] == 2 and summary["failed"] == 0
    # The forced progress bar went to stderr, with the count, the elapsed time and the time remaining.
    assert drawn_progress(err), err[-2000:]
    assert "2 images: 2 done" in out

    # Nothing in the working directory but the output folder, and nothing in it but the outputs.
    assert sorted(p.name for p in outside["cwd"].iterdir()) == ["out"]
    assert {p.name for p in (outside["cwd"] / "out").iterdir()} == expected_outputs(["tile_0", "tile_1"])


def test_batch_progress_in_a_prefect_flow_run(prefect_api: None, outside: dict[str, Path]) -> None:
    """With an API (the session's test server) the batch is a real flow run, and the bar is drawn there too."""
    from prefect.client.orchestration import get_client

    out = outside["cwd"].parent / "flow_out"
    args = ["batch", str(outside["images"]), str(out), "--model", str(outside["model"]), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["orchestrated"] is True and summary["ok"] == 2
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(summary["flow_run_id"])
    assert run.state is not None and run.state.is_completed()
    assert drawn_progress(result.stderr), result.stderr[-2000:]

    result = CliRunner().invoke(app, [*args, "--no-progress", "--force"])
    assert result.exit_code == 0 and " eta " not in result.stderr


def test_batch_with_a_prefect_api_that_does_not_answer_says_so(outside: dict[str, Path]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = outside["cwd"] / "out"
    args = ["batch", str(outside["images"]), str(out), "--model", str(outside["model"]), "--device", "cpu"]
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # the discard port: nothing there
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "the Prefect API at http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in result.output
    assert not (out / "batch_summary.json").exists()


# --- MLflow model URIs outside a project -------------------------------------------------------------


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[str]:
    """A real MLflow SQLite store (outside the working directory) holding the tiny model as nucleiseg@champion."""
    import mlflow
    import torch

    from nucleiseg.models import create_model

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "store" / "art").as_uri())
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no pretrained weights offline; MLflow's pickle notices
            kwargs = {k: v for k, v in TINY_MODEL_KWARGS.items() if k != "name"}
            model = create_model("resunet34", encoder_weights="none", **kwargs).eval()
            metadata = {"model_name": "resunet34", "model_kwargs": TINY_MODEL_KWARGS, "norm_mean": [0.7, 0.5, 0.7],
                        "norm_std": [0.15, 0.2, 0.15], "stain": None, "infer": TINY_INFER,
                        "post": {"min_area": 5, "radius": 1}, "mpp": 0.25}  # fmt: skip
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.pytorch.log_model(
                    model, name="model", serialization_format="pickle", metadata=metadata,
                    input_example=np.zeros((1, 3, 64, 64), dtype=np.float32),
                )  # fmt: skip
            version = mlflow.register_model(info.model_uri, "nucleiseg").version
        mlflow.MlflowClient().set_registered_model_alias("nucleiseg", "champion", version)
        yield uri
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_mlflow_uri_outside_a_project_needs_a_store_and_creates_none(
    outside: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(outside["cwd"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = str(outside["images"])
    commands = {
        "predict": ["predict", "models:/nucleiseg@champion", images, "--out", "out", "--device", "cpu"],
        "batch": ["batch", images, "out", "--device", "cpu", "--no-progress"],  # the champion by default
        "slide": ["slide", str(outside["images"] / "tile_0.png"), "--out", "out", "--device", "cpu"],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "set MLFLOW_TRACKING_URI" in result.output, (name, result.output)
        assert list(outside["cwd"].iterdir()) == [], name  # no ./mlruns/mlflow.db, not even the output folder

    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    for name, args in commands.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and f"{missing}: no MLflow store there" in result.output, (name, result.output)
        assert not missing.parent.exists() and list(outside["cwd"].iterdir()) == [], name


def test_mlflow_uri_outside_a_project_reads_the_store_it_is_given(
    registry: str, outside: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(outside["cwd"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    images = str(outside["images"])
    result = CliRunner().invoke(
        app, ["predict", "models:/nucleiseg@champion", images, "--out", "pred", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no Prefect API, whatever ran before
        result = CliRunner().invoke(app, ["batch", images, "batch", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert " eta " not in result.stderr  # stderr is not a terminal: no progress bar unless --progress
    summary = json.loads((outside["cwd"] / "batch" / "batch_summary.json").read_text())
    assert summary["model"]["identity"].startswith("models:/nucleiseg/1 (run ") and summary["ok"] == 2
    assert sorted(p.name for p in outside["cwd"].iterdir()) == ["batch", "pred"]  # only the outputs asked for
