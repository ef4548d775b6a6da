"""The Prefect batch-inference flow, run for real (temporary Prefect API, real checkpoint and MLflow registry)
on tiny images: outputs, a corrupt image failing alone, the summary and artifact, and the up-to-date skips."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.export import output_paths
from nucleiseg.infer import PostSettings
from nucleiseg.io import write_image
from nucleiseg.labels import read_label

MEAN = (0.7, 0.5, 0.7)
STD = (0.15, 0.2, 0.15)
INFER = {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False}
POST = {"min_area": 5, "radius": 1}
MODEL_KWARGS = {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int) -> torch.nn.Module:
    from nucleiseg.models import create_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(
            "resunet34", encoder=MODEL_KWARGS["encoder"], encoder_weights="none", dropout=MODEL_KWARGS["dropout"]
        ).eval()


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint in the format :func:`nucleiseg.infer.load_predictor` reads."""
    torch.save(
        {
            "model_name": "resunet34",
            "model_kwargs": MODEL_KWARGS,
            "state_dict": tiny_model(seed).state_dict(),
            "norm_mean": list(MEAN),
            "norm_std": list(STD),
            "stain": None,
            "infer": INFER,
            "post": POST,
        },
        path,
    )
    return path


def tissue(seed: int, size: int = 64) -> np.ndarray:
    """Dark blobs on a pink background (any RGB works; this one gives the random net something to cut)."""
    rng = np.random.default_rng(seed)
    dark = np.repeat(np.repeat(rng.random((size // 8, size // 8)) < 0.3, 8, 0), 8, 1)
    base = np.where(dark[..., None], [70, 40, 120], [230, 180, 210]).astype(np.uint8)
    return base + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)


@pytest.fixture()
def workspace(tmp_path: Path) -> dict[str, Path]:
    """Two good images and one truncated PNG, a checkpoint, and a params file with the tiny tiling."""
    images = tmp_path / "images"
    write_image(images / "a.png", tissue(1))
    write_image(images / "b.png", tissue(2, size=80))
    data = (images / "a.png").read_bytes()
    (images / "corrupt.png").write_bytes(data[: len(data) // 3])
    params = tmp_path / "params.yaml"
    params.write_text(
        f"infer: {json.dumps(INFER)}\npost: {json.dumps(POST)}\n"
        f"tracking:\n  uri: sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}\n  artifacts: {tmp_path / 'mlruns' / 'art'}\n"
    )
    return {
        "images": images,
        "out": tmp_path / "out",
        "params": params,
        "checkpoint": write_checkpoint(tmp_path / "model.pt"),
    }


def run_batch(ws: dict[str, Path], *extra: str, model: str | None = None) -> tuple[int, str, dict]:
    """``nucleiseg batch`` on the workspace; ``model`` defaults to its checkpoint, ``""`` leaves --model out."""
    # CPU everywhere: on CUDA the network runs in bfloat16, and the test compares with a CPU prediction.
    args = ["batch", str(ws["images"]), str(ws["out"]), "--params", str(ws["params"]), "--device", "cpu", *extra]
    model = str(ws["checkpoint"]) if model is None else model
    if model:
        args += ["--model", model]
    result = CliRunner().invoke(app, args)
    summary_path = ws["out"] / "batch_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return result.exit_code, result.output, summary


def by_name(summary: dict) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in summary["results"]}


def output_mtimes(out: Path, name: str) -> dict[str, int]:
    return {k: p.stat().st_mtime_ns for k, p in output_paths(out, name).items()}


def test_batch_writes_outputs_and_a_corrupt_image_fails_alone(prefect_api: None, workspace: dict[str, Path]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from nucleiseg.infer import load_predictor
    from nucleiseg.io import read_image
    from pipelines.batch_inference import ARTIFACT_KEY

    code, output, summary = run_batch(workspace)
    assert code == 1, output
    assert "corrupt.png" in output and "2 done, 0 skipped (up to date), 1 failed" in output
    results = by_name(summary)
    assert [results[n]["status"] for n in ("a.png", "b.png", "corrupt.png")] == ["ok", "ok", "failed"]
    error = results["corrupt.png"]["error"]
    assert error.startswith("ImageReadError") and str(workspace["images"] / "corrupt.png") in error
    assert (summary["inputs"], summary["ok"], summary["skipped"], summary["failed"]) == (3, 2, 0, 1)
    assert summary["settings"] == {"infer": INFER, "post": {**PostSettings().__dict__, **POST}}
    assert summary["model"]["identity"].startswith(f"{workspace['checkpoint'].resolve()}#sha256:")
    assert summary["runner"] == "threads"

    # The outputs are those of the model applied directly with the same settings.
    predictor = load_predictor(workspace["checkpoint"], device="cpu")
    for name in ("a", "b"):
        paths = output_paths(workspace["out"], name)
        assert all(p.is_file() for p in paths.values())
        label = read_label(paths["label"])
        np.testing.assert_array_equal(label, predictor.label(read_image(workspace["images"] / f"{name}.png")))
        assert results[f"{name}.png"]["nuclei"] == len(np.unique(label[label > 0]))
    assert not list(workspace["out"].glob("corrupt*"))

    # In Prefect: one mapped task run per image, only the corrupt one failed, the flow run completed, and the
    # summary table was recorded as an artifact of that run.
    run_id = UUID(summary["flow_run_id"])
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_completed()
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        )
    # A corrupt image is an expected outcome, not a crash: its task completes with a failed entry and one
    # warning line, not a Prefect traceback.
    states = {t.name: t.state.type.value for t in task_runs}
    predicted = {name: state for name, state in states.items() if name.startswith("predict-")}
    assert predicted == {"predict-a": "COMPLETED", "predict-b": "COMPLETED", "predict-corrupt": "COMPLETED"}
    # the spatial report task runs for the images that were segmented, never for the corrupt one
    assert {name for name in states if not name.startswith("predict-")} == {"spatial-a", "spatial-b"}
    assert set(states.values()) == {"COMPLETED"}
    assert "Task run failed with exception" not in output  # what precedes a Prefect task traceback
    (artifact,) = artifacts
    assert "| corrupt.png | failed |" in artifact.data and "| a.png | ok |" in artifact.data
    assert "ImageReadError" in artifact.data


def test_rerun_skips_up_to_date_images_and_recomputes_what_changed(
    prefect_api: None, workspace: dict[str, Path]
) -> None:
    out = workspace["out"]
    code, _, summary = run_batch(workspace)
    assert code == 1
    first = by_name(summary)
    before = {n: output_mtimes(out, n) for n in ("a", "b")}

    code, output, summary = run_batch(workspace)
    assert code == 1  # the corrupt image still fails
    results = by_name(summary)
    assert [results[n]["status"] for n in ("a.png", "b.png", "corrupt.png")] == ["skipped", "skipped", "failed"]
    assert results["a.png"]["reason"].startswith("up to date: same input content")
    for name in ("a.png", "b.png"):  # the skipped images keep their figures in the summary
        assert results[name]["nuclei"] == first[name]["nuclei"] and results[name]["outputs"] == first[name]["outputs"]
    assert summary["skipped"] == 2 and "0 done, 2 skipped" in output
    assert {n: output_mtimes(out, n) for n in ("a", "b")} == before  # nothing rewritten

    # A touched input (same bytes) stays skipped: times are not content.
    future = time.time() + 5
    os.utime(workspace["images"] / "a.png", (future, future))
    assert by_name(run_batch(workspace)[2])["a.png"]["status"] == "skipped"
    # A changed input is recomputed even when it keeps its old time (cp -p, rsync -a, tar x); the other stays.
    stat = (workspace["images"] / "a.png").stat()
    write_image(workspace["images"] / "a.png", tissue(7))
    os.utime(workspace["images"] / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    results = by_name(run_batch(workspace)[2])
    assert (results["a.png"]["status"], results["a.png"]["reason"]) == ("ok", "input content changed")
    assert results["b.png"]["status"] == "skipped"
    assert output_mtimes(out, "a") != before["a"] and output_mtimes(out, "b") == before["b"]
    # An output edited by hand since it was written is the user's now: not replaced without --force.
    (out / "b.geojson").write_text("{}")
    code, output, _ = run_batch(workspace)
    assert code == 1 and "b.geojson" in output and "--force" in output
    assert (out / "b.geojson").read_text() == "{}"
    results = by_name(run_batch(workspace, "--force")[2])
    assert results["b.png"]["status"] == "ok" and "outputs changed" in results["b.png"]["reason"]

    # Other settings, or another model at the same path, recompute everything.
    results = by_name(run_batch(workspace, "--set", "post.min_area=9")[2])
    assert {results[n]["status"] for n in ("a.png", "b.png")} == {"ok"}
    assert results["b.png"]["reason"] == "settings changed"
    write_checkpoint(workspace["checkpoint"], seed=1)
    _, _, summary = run_batch(workspace, "--set", "post.min_area=9")
    results = by_name(summary)
    assert {results[n]["status"] for n in ("a.png", "b.png")} == {"ok"}
    assert results["b.png"]["reason"].startswith("model changed")


def test_registry_alias_is_pinned_and_a_new_champion_recomputes(
    prefect_api: None, workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real MLflow SQLite registry: ``models:/<name>@champion`` resolves to a version, recorded in the summary;
    moving the alias to a new version recomputes every image, and the next run skips them."""
    import mlflow
    from mlflow import MlflowClient

    from nucleiseg import tracking

    (workspace["images"] / "corrupt.png").unlink()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    root = workspace["params"].parent / "mlruns"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    try:
        tracking.configure(uri, "nucleiseg", root / "art")
        client = MlflowClient(uri, uri)
        example = np.zeros((1, 3, 64, 64), dtype=np.float32)
        metadata = {"model_kwargs": MODEL_KWARGS, "norm_mean": list(MEAN), "norm_std": list(STD),
                    "stain": None, "infer": INFER, "post": POST}  # fmt: skip
        with mlflow.start_run():
            info = tracking.log_pytorch_model(tiny_model(0), example, metadata=metadata)
        # Two versions (as after a retraining; the same weights suffice: identity is the version).
        versions = [mlflow.register_model(info.model_uri, "nucleiseg").version for _ in range(2)]
        client.set_registered_model_alias("nucleiseg", "champion", versions[0])

        code, output, summary = run_batch(workspace, model="models:/nucleiseg@champion")
        assert code == 0, output
        assert summary["model"]["version"] == str(versions[0]) and summary["ok"] == 2
        assert summary["model"]["identity"].startswith(f"models:/nucleiseg/{versions[0]} (run ")

        client.set_registered_model_alias("nucleiseg", "champion", versions[1])
        code, output, summary = run_batch(workspace, model="")  # the champion of promote.model_name
        assert code == 0, output
        assert summary["model"]["uri"] == "models:/nucleiseg@champion"
        assert summary["model"]["version"] == str(versions[1]) and summary["ok"] == 2
        assert by_name(summary)["a.png"]["reason"].startswith(f"model changed (was models:/nucleiseg/{versions[0]}")

        code, output, summary = run_batch(workspace, model="")
        assert code == 0 and summary["skipped"] == 2

        code, output, _ = run_batch(workspace, model="models:/nucleiseg@no-such-alias")
        assert code == 1 and "models:/nucleiseg@no-such-alias" in output
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_unusable_runner_or_folders_stop_before_any_image(prefect_api: None, workspace: dict[str, Path]) -> None:
    import importlib.util

    if importlib.util.find_spec("prefect_dask") is None:
        code, output, _ = run_batch(workspace, "--runner", "dask")
        assert code == 1 and "prefect-dask" in output
    code, output, _ = run_batch(workspace, "--runner", "ray")
    assert code == 2 and "--runner 'ray'" in output
    workspace["out"] = workspace["images"]
    code, output, _ = run_batch(workspace)
    assert code == 1 and "the output folder is the input" in output
    assert not list(workspace["images"].glob("*_overlay.png"))


# --- no Prefect needed ------------------------------------------------------------------------------


def test_same_output_name_fails_the_later_input(tmp_path: Path) -> None:
    from pipelines.batch_inference import ModelVersionInfo, plan_images

    first, second = tmp_path / "x.png", tmp_path / "x.tif"
    planned = plan_images([first, second], tmp_path / "out", ModelVersionInfo("m", "m", "m", 0.0), {}, None)
    assert planned[0].entry is None and planned[0].reason == "no previous summary"
    assert planned[1].entry["status"] == "failed" and str(first) in planned[1].entry["error"]


def test_plan_reuses_only_complete_results_of_the_same_model_and_settings(tmp_path: Path) -> None:
    from nucleiseg.outputs import file_sha256, record_files
    from pipelines.batch_inference import ModelVersionInfo, plan_images

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    files = []
    for name in "abcdef":
        path = inputs / f"{name}.png"
        path.write_bytes(b"image " + name.encode())
        files.append(path)
        for output in output_paths(out, name).values():
            output.write_bytes(b"y")
        record_files(out, output_paths(out, name).values())
    sha = {p.stem: file_sha256(p) for p in files}
    output_paths(out, "c")["geojson"].unlink()
    (inputs / "e.png").write_bytes(b"new content, whatever its time")
    output_paths(out, "f")["nuclei"].write_bytes(b"edited by hand")
    settings = {"infer": INFER, "post": POST}
    status = {"a": "ok", "b": "pending", "c": "ok", "d": "failed", "e": "skipped", "f": "ok"}
    previous = {
        "model": {"identity": "m1"},
        "settings": settings,
        "results": [
            {"input": str(inputs / f"{n}.png"), "status": s, "nuclei": 7, "input_sha256": sha[n]}
            for n, s in status.items()
        ],
    }

    def plan(model: ModelVersionInfo, prev: dict = previous, s: dict = settings) -> dict[str, tuple[bool, str]]:
        return {p.name: (p.entry is not None, p.reason) for p in plan_images(files, out, model, s, prev)}

    got = plan(ModelVersionInfo("m", "m", "m1", 0.0))
    assert got["a"][0] and "up to date" in got["a"][1]
    assert got["b"] == (False, "pending in the previous run")  # an interrupted run's image
    assert got["c"] == (False, "outputs missing: c.geojson")
    assert got["d"] == (False, "failed in the previous run")
    assert got["e"] == (False, "input content changed")
    assert got["f"] == (False, "outputs changed since they were written: f_nuclei.csv")
    assert plan(ModelVersionInfo("m", "m", "m1", None))["a"] == (False, "model time unknown: never skipped")
    assert plan(ModelVersionInfo("m", "m", "m2", 0.0))["a"] == (False, "model changed (was m1)")
    assert plan(ModelVersionInfo("m", "m", "m1", 0.0), s={**settings, "post": {}})["a"] == (False, "settings changed")
    planned = plan_images(files, out, ModelVersionInfo("m", "m", "m1", 0.0), settings, previous)
    assert planned[0].entry["status"] == "skipped" and planned[0].entry["nuclei"] == 7  # figures carried over
    assert [p.sha256 for p in planned] == [file_sha256(f) for f in files]


def test_worker_predictor_loads_once_per_process_and_model_identity(tmp_path: Path) -> None:
    from pipelines.batch_inference import ModelSource, resolve_model, worker_predictor

    ckpt = write_checkpoint(tmp_path / "m.pt")
    info = resolve_model(ckpt)
    source = ModelSource(info.load_ref, info.identity, "cpu")
    assert worker_predictor(source) is worker_predictor(source)
    write_checkpoint(ckpt, seed=1)  # retrained in place: a new identity, so a new load
    info2 = resolve_model(ckpt)
    assert info2.identity != info.identity and info2.time >= info.time
    assert worker_predictor(ModelSource(info2.load_ref, info2.identity, "cpu")) is not worker_predictor(source)
