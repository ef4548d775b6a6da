"""Retraining when new annotations land: the real flow, DVC, MLflow and pipeline on a tiny preset.

One module-scoped copy of the repository trains on ``data/`` (6 synthetic tiles, versioned by ``dvc add``) and runs
``dvc repro`` once for the first champion; the tests then call the flow in order: nothing new, a broken annotation
put into ``data/`` by hand, corrected annotations (QuPath GeoJSON and a label PNG) dropped in the inbox.
tests/test_inbox.py covers refused inbox sets and the served deployment's event trigger.
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
    env.pop("MLFLOW_REGISTRY_URI", None)
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
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
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


def test_deployment_carries_inbox_trigger_schedule_and_concurrency_limit():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from pipelines.inbox_watch import INBOX_EVENT
    from pipelines.retrain import DEPLOYMENT_NAME, build_deployment

    settings = load_params(None, ["schedule.cron=30 3 * * 1", "schedule.timezone=Europe/Paris", "data.inbox=drop"])
    deployment = build_deployment(settings, REPO, "params.yaml")
    assert deployment.name == DEPLOYMENT_NAME
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 3 * * 1" and schedule.schedule.timezone == "Europe/Paris"
    assert schedule.parameters == {"trigger": "schedule"}
    (trigger,) = deployment.triggers
    assert trigger.expect == {INBOX_EVENT} and trigger.threshold == 1
    assert trigger.match.model_dump()["prefect.resource.id"] == f"nucleiseg.inbox.{REPO / 'drop'}"
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
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


def _same_nuclei(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labels hold the same nuclei (same pixels, same class), whatever their ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    one_to_one = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    return bool(one_to_one and np.all((pairs[0] == 0) == (pairs[1] == 0)) and np.all(pairs[0] % 3 == pairs[1] % 3))


def _cached_file(root: Path, dvc_file_text: str, relpath: str) -> bytes:
    """The bytes of ``relpath`` in the directory version a ``.dvc`` file names, read from the DVC cache."""
    dir_md5 = yaml.safe_load(dvc_file_text)["outs"][0]["md5"].removesuffix(".dir")
    cache = root / ".dvc" / "cache" / "files" / "md5"
    entries = json.loads((cache / dir_md5[:2] / f"{dir_md5[2:]}.dir").read_text())
    (md5,) = [e["md5"] for e in entries if e["relpath"] == relpath]
    return (cache / md5[:2] / md5[2:]).read_bytes()


@pytest.mark.slow  # shares a module fixture that runs the real pipeline (~3 min on 2 loaded cores)
def test_corrections_from_qupath_dropped_in_the_inbox_are_merged_versioned_and_retrained(flow_env):
    """The loop of README "Correct in QuPath, retrain": a tile's predicted nuclei exported as QuPath GeoJSON, corrected
    as a pathologist would (a false positive deleted, a nucleus reclassified, a missed one drawn), dropped in the inbox
    with the image, beside a corrected label PNG of a training tile; the flow imports, validates, merges, versions,
    retrains and records the gate's decision."""
    from mlflow import MlflowClient

    from nucleiseg.export import nucleus_polygons, to_geojson
    from nucleiseg.inbox import DONE
    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label, write_label
    from nucleiseg.palette import QUPATH_NAMES
    from nucleiseg.registry import lookup_metric
    from nucleiseg.synth import write_dataset
    from nucleiseg.tracking import dataset_hash

    root = flow_env
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    before, dvc_before = _registry(root), (root / "data.dvc").read_text()

    # A new tile and its prediction. The tests' champion (2 training steps) finds no nuclei at all, which would leave
    # nothing to correct, so the prediction is the tile's reference label with the three errors a model makes: a
    # missed nucleus, one of the wrong class, and a false positive. The export is `nucleiseg predict`'s, as QuPath
    # annotations (editable).
    write_dataset(root.parent / "slide", 1, 256, seed=11, prefix="slide")
    truth = read_label(root.parent / "slide" / "slide_000_label.png")
    ids = [int(i) for i in np.unique(truth) if i]
    missed, misclassified = ids[0], ids[1]
    free = int(truth.max()) + 1
    wrong_id = next(i for i in range(free, free + 3) if i % 3 != misclassified % 3)
    false_positive = next(i for i in range(wrong_id + 1, wrong_id + 4) if i % 3 == 0)
    predicted = truth.copy()
    predicted[truth == missed] = 0
    predicted[truth == misclassified] = wrong_id
    empty = (
        (y, x) for y in range(8, 248, 4) for x in range(8, 248, 4) if not truth[y - 8 : y + 9, x - 8 : x + 9].any()
    )
    cy, cx = next(empty)
    yy, xx = np.ogrid[:256, :256]
    predicted[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = false_positive  # a disk of radius 5 px where no nucleus is
    exported = to_geojson(predicted, image_name="slide_000", object_type="annotation")

    # The pathologist's corrections, on the GeoJSON as QuPath writes it back.
    features = [f for f in exported["features"] if f["properties"]["measurements"]["id"] != false_positive]
    (wrong,) = [f for f in features if f["properties"]["measurements"]["id"] == wrong_id]
    wrong["properties"]["classification"] = {"name": QUPATH_NAMES[misclassified % 3]}
    drawn = nucleus_polygons(truth)[missed]
    features.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [drawn.tolist()]},
            "properties": {"objectType": "annotation", "classification": {"name": QUPATH_NAMES[missed % 3]}},
        }
    )
    assert len(features) == len(exported["features"])  # one deleted, one drawn
    (inbox / "slide_000.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (inbox / "slide_000.png").write_bytes((root.parent / "slide" / "slide_000.png").read_bytes())
    # and a training tile whose label had a false nucleus: its corrected label alone (the image is in data/)
    old_label_bytes = (root / "data" / "synth_001_label.png").read_bytes()
    corrected = read_label(root / "data" / "synth_001_label.png")
    corrected[corrected == corrected.max()] = 0
    write_label(inbox / "synth_001_label.png", corrected)

    summary = _retrain(root)

    assert summary["action"] == "retrained", summary
    intake = summary["inbox"]
    assert intake["action"] == "merged" and intake["added"] == ["slide_000"] and intake["replaced"] == ["synth_001"]
    assert sorted(intake["landed"]) == ["slide_000.geojson", "slide_000.png", "synth_001_label.png"]
    # imported exactly as corrected: the reference nuclei, each of its class; the corrected label as dropped
    assert _same_nuclei(read_label(root / "data" / "slide_000_label.png"), truth)
    assert np.array_equal(read_image(root / "data" / "slide_000.png"), read_image(root.parent / "slide/slide_000.png"))
    assert np.array_equal(read_label(root / "data" / "synth_001_label.png"), corrected)
    assert not [p for p in inbox.iterdir() if p.is_file()]

    # versioned: data.dvc moved on, pushed; the previous version's labels are in the DVC cache
    archive = Path(intake["archive"])
    assert archive.parent == inbox / DONE
    assert (archive / "data.dvc.before").read_text() == dvc_before != (root / "data.dvc").read_text()
    assert _cached_file(root, dvc_before, "synth_001_label.png") == old_label_bytes
    assert (archive / "replaced" / "synth_001_label.png").read_bytes() == old_label_bytes
    nfiles = yaml.safe_load(dvc_before)["outs"][0]["nfiles"] + 2  # the new tile's image and label
    assert yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["nfiles"] == nfiles
    assert summary["pushed"] and any((root / ".dvc-remote").rglob("*"))  # the repo's default local remote

    # retrained: a new version, trained on exactly this data, and the gate's decision in the run's record
    after = _registry(root)
    new_version = str(int(before["latest_version"]) + 1)
    assert summary["version"] == after["latest_version"] == new_version
    registry = json.loads(after["report"])
    assert registry["version"] == new_version and registry["aliases"] == after["aliases"]
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("nucleiseg", new_version).tags
    assert tags["dataset_hash"] == dataset_hash(root / "data") == summary["dataset_hash"]
    record = json.loads((archive / "record.json").read_text())
    assert record["decision"] == summary["decision"] and record["reason"] == summary["reason"]
    assert record["version"] == new_version and record["inbox"]["added"] == ["slide_000"]

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

    # The gate has judged these annotations: the next scheduled run (the inbox empty) does nothing.
    again = _retrain(root)
    assert again["action"] == "none" and again["inbox"]["action"] == "empty", again
    assert _registry(root) == after
