"""Crashes and interruptions: models that cannot serve are named before any work, and a killed run leaves no
temporary files, a summary of what is pending, and no Prefect server behind; ``predict --resume`` goes on.

Kills are real: the ``nucleiseg`` command runs in its own process and receives SIGTERM mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, write_tiny_checkpoint
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import write_image
from nucleiseg.outputs import RECORD_NAME
from nucleiseg.synth import synth_tile


def command(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    """``python -m nucleiseg ARGS`` in its own process (one thread, no MLflow store or Prefect API configured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "nucleiseg", *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def images(folder: Path, n: int, size: int) -> Path:
    for k in range(n):
        write_image(folder / f"tile_{k:02d}.png", synth_tile(k, size)[0])
    return folder


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != RECORD_NAME)


# ----------------------------------------------------------------------------------------------------
# Models that cannot serve


def test_predict_refuses_a_model_with_nan_weights_naming_it(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "nan.pt")
    state = torch.load(checkpoint, weights_only=True)
    first = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][first][...] = float("nan")
    torch.save(state, checkpoint)
    write_image(tmp_path / "in" / "a.png", synth_tile(0, 64)[0])
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"{checkpoint}: non-finite weights" in result.output, result.output
    assert not list((tmp_path / "o").glob("a*"))  # no "ok, 0 nuclei"


def _mlflow_folder(path: Path) -> Path:
    import mlflow.pytorch

    model = torch.nn.Conv2d(3, 5, 1)
    metadata = {"norm_mean": [0.5] * 3, "norm_std": [0.25] * 3, "infer": {"tile": 64, "overlap": 16}}
    mlflow.pytorch.save_model(model, path, serialization_format="pickle", metadata=metadata)
    return path


def test_predict_with_a_local_mlflow_model_folder_needs_no_tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from nucleiseg.infer import PickledModelWarning

    model = _mlflow_folder(tmp_path / "model")
    write_image(tmp_path / "a.png", synth_tile(0, 64)[0])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)  # MLflow's default: a ./mlflow.db store in the working directory
    try:
        with pytest.warns(PickledModelWarning, match="pickle"):  # says that loading it runs its code
            result = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "a.png"), "--out", "../out"])
    finally:
        mlflow.set_tracking_uri(before)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a_label.png").is_file()
    assert list(work.iterdir()) == []  # no ./mlflow.db left behind


def test_a_corrupt_mlflow_model_is_named(tmp_path: Path) -> None:
    model = _mlflow_folder(tmp_path / "model")
    (weights,) = model.rglob("model.pth")
    weights.write_bytes(weights.read_bytes()[:40])
    write_image(tmp_path / "a.png", synth_tile(0, 64)[0])
    result = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and f"{model}: cannot load the MLflow model" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ----------------------------------------------------------------------------------------------------
# Output paths that cannot be written: refused before any work


def test_batch_evaluate_and_import_refuse_an_output_that_is_a_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    data = images(tmp_path / "data", 1, 64)
    taken = tmp_path / "taken"
    taken.write_text("a file")
    runs = {
        "batch": ["batch", data, taken, "--model", tiny_checkpoint],
        "import": ["import", "folder", data, taken],
        "evaluate": ["evaluate", data, data, "--out", tmp_path],  # a folder where the report file should go
    }
    for name, args in runs.items():
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and "is not a" in result.output, (name, result.output)
        assert "Traceback" not in result.output
    assert taken.read_text() == "a file"


# ----------------------------------------------------------------------------------------------------
# Killed runs


def test_killed_predict_leaves_a_summary_and_no_temporaries_and_resumes(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "model.pt")
    data = images(tmp_path / "data", 5, 320)
    out = tmp_path / "out"
    summary = out / "summary.json"

    def done() -> int:
        try:
            return sum(r["status"] == "ok" for r in json.loads(summary.read_text())["results"])
        except (OSError, ValueError, KeyError):
            return 0

    run = command("predict", checkpoint, data, "--out", out, "--device", "cpu")
    wait_for(lambda: done() >= 1 or run.poll() is not None, what="the first prediction")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    first = json.loads(summary.read_text())
    pending = first["pending"]
    kept = {r["input"]: r for r in first["results"] if r["status"] == "ok"}
    assert pending and kept and len(pending) + len(kept) == 5
    assert hidden(out) == []  # no half-written outputs left by the kill
    times = {p: os.stat(p).st_mtime_ns for r in kept.values() for p in r["outputs"].values()}

    run = command("predict", checkpoint, data, "--out", out, "--device", "cpu", "--resume")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    final = json.loads(summary.read_text())
    assert final["pending"] == [] and final["ok"] == 5
    assert {p: os.stat(p).st_mtime_ns for p in times} == times  # what was done was kept, not recomputed


def test_killed_batch_leaves_no_temporary_files_and_says_what_is_pending(tmp_path: Path) -> None:
    """Without a Prefect API the batch starts no server (pipelines/execution.py): no child process to leave."""
    checkpoint = write_tiny_checkpoint(tmp_path / "model.pt")
    data = images(tmp_path / "data", 3, 256)
    out = tmp_path / "out"
    run = command("batch", data, out, "--model", checkpoint, "--device", "cpu", "--workers", "1", cwd=tmp_path)
    parent = psutil.Process(run.pid)
    wait_for(lambda: (out / "batch_summary.json").is_file() or run.poll() is not None, what="the batch to start")
    children = parent.children(recursive=True)
    assert children == [], [p.cmdline() for p in children]
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert hidden(out) == []
    pending = [r for r in json.loads((out / "batch_summary.json").read_text())["results"] if r["status"] == "pending"]
    assert pending  # the summary says what was not done


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """Each test ends with no child process of its own left (processes that were there before, such as the
    session's Prefect server, are not its own)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(leftover, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, [p.pid for p in alive]
