"""The promotion gate cannot be fooled: it scores what it registers, loads what it promotes, changes nothing when
it fails, and decides one registration at a time. Real MLflow SQLite store, real models, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nucleiseg import registry, tracking
from nucleiseg.cli import app
from nucleiseg.registry import CHALLENGER, CHAMPION, RegistryError

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
INFER = {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False}
REPO = Path(__file__).resolve().parents[1]


def conv_model(kind: str) -> torch.nn.Module:
    """A 1x1 convolution as a whole model: ``detector`` calls dark pixels tumor inside (it finds nuclei),
    ``blank`` calls everything background, ``nan`` has NaN weights."""
    model = torch.nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        if kind == "detector":
            model.weight[1] = -5.0  # channel 1: tumor inside, where the normalised RGB is dark
            model.bias[1] = 10.0
        elif kind == "blank":
            model.bias[1:] = -10.0
        elif kind == "nan":
            model.weight[2, 0] = float("nan")
    return model.eval()


class Store:
    def __init__(self, root: Path, uri: str, models: dict[str, str]) -> None:
        self.root, self.uri, self.models = root, uri, models


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A store with four logged models: detector, blank, nan, and corrupt (its weights file truncated)."""
    import mlflow

    root = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{root}/mlflow.db"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(uri, "gate-tests", root / "artifacts")
        example = np.zeros((1, 3, 16, 16), np.float32)
        models = {}
        for kind in ("detector", "blank", "nan", "corrupt", "late-corrupt"):
            with mlflow.start_run():
                metadata = {"norm_mean": MEAN, "norm_std": STD, "infer": INFER, "stain": None}
                info = tracking.log_pytorch_model(conv_model("blank" if "corrupt" in kind else kind), example, metadata)
            models[kind] = info.model_uri
        weights = _weights_file(root, models["corrupt"])
        weights.write_bytes(weights.read_bytes()[:50])
        yield Store(root, uri, models)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _weights_file(root: Path, model_uri: str) -> Path:
    model_id = model_uri.removeprefix("models:/")
    (found,) = [p for p in (root / "artifacts").rglob("model.pth") if model_id in p.as_posix()]
    return found


@pytest.fixture(scope="module")
def project(store: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny annotated dataset with its split, a params file on the store, and a forged metrics report."""
    from nucleiseg.synth import write_dataset

    root = tmp_path_factory.mktemp("project")
    data = root / "data"
    write_dataset(data, n_images=3, size=96, seed=5)
    names = sorted(p.stem for p in data.glob("*.png") if not p.stem.endswith("_label"))
    (root / "prepared").mkdir()
    (root / "prepared" / "splits.json").write_text(
        json.dumps({"train": names[:1], "val": names[1:2], "test": names[2:]})
    )
    (root / "reports").mkdir()
    # What a forger (or a stale evaluate stage) leaves: a perfect score for whatever model is registered next.
    (root / "reports" / "metrics.json").write_text(json.dumps({"summary": {"all": {"f1": 0.99, "dice": 0.99}}}))
    params = root / "params.yaml"
    params.write_text(
        f"data: {{dir: {data}, prepared: {root / 'prepared'}}}\n"
        f"infer: {json.dumps(INFER)}\npost: {{min_area: 5}}\neval: {{out: {root / 'reports' / 'metrics.json'}}}\n"
        f"train: {{device: cpu, out_dir: {root / 'models'}}}\n"
        f"tracking: {{uri: '{store.uri}', artifacts: {store.root / 'artifacts'}}}\n"
    )
    return {"root": root, "data": data, "params": params, "splits": root / "prepared" / "splits.json"}


def register(project: dict[str, Path], store: Store, kind: str, name: str) -> tuple[int, str, dict[str, Any]]:
    """``nucleiseg register`` of one of the store's models as a version of ``name``."""
    models = project["root"] / "models"
    models.mkdir(exist_ok=True)
    (models / "model_uri").write_text(store.models[kind])
    out = project["root"] / "reports" / f"registry-{name}.json"
    args = ["register", "--params", project["params"], "--set", f"promote.model_name={name}", "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    report = json.loads(out.read_text()) if out.is_file() and result.exit_code == 0 else {}
    return result.exit_code, result.output, report


def _tags(store: Store, name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient(store.uri, store.uri).get_model_version(name, version).tags)


def _versions(store: Store, name: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(v.version) for v in MlflowClient(store.uri, store.uri).search_model_versions(f"name = '{name}'"))


def _own_score(project: dict[str, Path], model_uri: str) -> float:
    """The test-split F1 of a model, computed here as the evaluate stage does."""
    from nucleiseg.evaluation import evaluate_model, split_items
    from nucleiseg.infer import InferSettings, load_predictor

    predictor = load_predictor(model_uri, device="cpu")
    predictor.infer = InferSettings(**INFER)
    predictor.post = type(predictor.post)(**{**predictor.post.__dict__, "min_area": 5})
    items = split_items(project["data"], project["splits"], "test")
    return evaluate_model(predictor, items)["summary"]["all"]["f1"]


# ----------------------------------------------------------------------------------------------------
# register scores the model itself


def test_register_scores_the_challenger_itself_whatever_the_metrics_file_says(
    store: Store, project: dict[str, Path]
) -> None:
    code, output, report = register(project, store, "detector", "own-score")
    assert code == 0, output
    tags = _tags(store, "own-score", report["version"])
    assert float(tags["test.all.f1"]) == pytest.approx(_own_score(project, store.models["detector"]), abs=1e-12)
    assert float(tags["test.all.f1"]) > 0 and report["decision"]["decision"] == "promoted"

    # The blank model finds nothing; reports/metrics.json claims F1 0.99 for it: the gate does not read it.
    code, output, report = register(project, store, "blank", "own-score")
    assert code == 0, output
    assert float(_tags(store, "own-score", report["version"])["test.all.f1"]) == 0.0
    assert report["decision"]["decision"] == "rejected" and report["aliases"][CHAMPION] == "1"


@pytest.mark.parametrize(("kind", "why"), [("nan", "non-finite weights"), ("corrupt", "cannot load the MLflow model")])
def test_a_model_that_cannot_serve_is_not_registered(store: Store, project: dict[str, Path], kind: str, why: str):
    name = f"broken-{kind}"
    assert register(project, store, "detector", name)[0] == 0
    code, output, _ = register(project, store, kind, name)
    assert code == 1 and why in output and store.models[kind] in output and "not registered" in output, output
    assert "Traceback" not in output
    assert _versions(store, name) == ["1"] and registry.registry_state(name, tracking_uri=store.uri)["aliases"] == {
        CHALLENGER: "1",
        CHAMPION: "1",
    }


def test_a_version_that_no_longer_loads_cannot_be_promoted_by_hand(store: Store, project: dict[str, Path]) -> None:
    name = "late-corrupt"
    assert register(project, store, "detector", name)[0] == 0
    code, output, report = register(project, store, "late-corrupt", name)
    assert code == 0 and report["decision"]["decision"] == "rejected", output
    weights = _weights_file(store.root, store.models["late-corrupt"])
    weights.write_bytes(b"garbage")  # the artifact store lost it after registration
    before = _tags(store, name, "2")
    args = ["promote", "--params", project["params"], "--set", f"promote.model_name={name}", "--version", "2"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and "failed its smoke test" in result.output and "Traceback" not in result.output
    assert registry.registry_state(name, tracking_uri=store.uri)["aliases"][CHAMPION] == "1"
    assert _tags(store, name, "2") == before


def test_cli_records_provenance_and_promotes_by_hand_and_by_gate(store: Store, project: dict[str, Path]) -> None:
    name = "cli-model"
    code, output, report = register(project, store, "detector", name)
    assert code == 0, output
    assert report["version"] == "1" and report["aliases"] == {CHALLENGER: "1", CHAMPION: "1"}
    assert report["split_hash"] == registry.split_hash(project["splits"])
    tags = _tags(store, name, "1")
    assert tags["dataset_hash"] == tracking.dataset_hash(project["data"])
    train_val = json.loads(project["splits"].read_text())
    assert tags["trained_on"] == ",".join(sorted(train_val["train"] + train_val["val"]))  # for the leakage check
    assert register(project, store, "blank", name)[2]["decision"]["decision"] == "rejected"

    common = ["--params", project["params"], "--set", f"promote.model_name={name}"]
    result = CliRunner().invoke(app, [str(a) for a in ["promote", *common, "--version", "2", "--reason", "reviewed"]])
    assert result.exit_code == 0 and "manual" in result.output, result.output
    assert _tags(store, name, "2")["promotion.decision"] == "manual"
    gate = project["root"] / "gate.json"
    result = CliRunner().invoke(app, [str(a) for a in ["promote", *common, "--out", gate]])
    assert result.exit_code == 0, result.output
    assert json.loads(gate.read_text())["decision"]["decision"] == "unchanged"  # challenger v2 is champion
    result = CliRunner().invoke(app, [str(a) for a in ["promote", *common, "--version", "7"]])
    assert result.exit_code == 1 and "no version 7" in result.output


# ----------------------------------------------------------------------------------------------------
# A failed gate changes nothing


def _summary(f1: float) -> dict[str, Any]:
    return {"all": {"f1": f1, "dice": 0.5}, "n_images": 1}


def test_a_gate_that_fails_on_a_new_split_leaves_every_tag_and_alias(store: Store) -> None:
    name = "failed-gate"
    common = {"dataset_hash": "d", "git_commit": None, "params_hash": "p", "tracking_uri": store.uri}
    registry.register_and_promote(store.models["detector"], name, _summary(0.4), split_hash="old", **common)
    registry.register_model(store.models["blank"], name, _summary(0.6), split_hash="old", **common)
    before = {v: _tags(store, name, v) for v in ("1", "2")}
    aliases = registry.registry_state(name, tracking_uri=store.uri)["aliases"]

    def evaluate(uri: str) -> dict[str, Any]:
        if uri.endswith("/1"):  # the champion, scored after the challenger: its model is gone
            raise OSError("artifact store unreachable")
        return _summary(0.7)

    with pytest.raises(RegistryError, match=r"cannot score models:/failed-gate/1 .*changed nothing"):
        registry.promote_challenger(name, split_hash="new", evaluate=evaluate, tracking_uri=store.uri)
    assert {v: _tags(store, name, v) for v in ("1", "2")} == before  # the challenger's figures were not rewritten
    assert registry.registry_state(name, tracking_uri=store.uri)["aliases"] == aliases


def test_gate_refuses_a_metric_without_a_direction(store: Store) -> None:
    with pytest.raises(RegistryError, match=r"'all\.fp' is not a figure with a known direction"):
        registry.promote_challenger("failed-gate", metric="all.fp", tracking_uri=store.uri)


# ----------------------------------------------------------------------------------------------------
# Concurrent registrations


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nucleiseg import registry
    uri, model_uri, name, f1, go = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), Path(sys.argv[5])
    summary = {"all": {"f1": f1, "dice": 0.5}, "n_images": 1}
    while not go.exists():  # every racer imported and ready: start together
        time.sleep(0.005)
    version, decision = registry.register_and_promote(
        model_uri, name, summary, dataset_hash="d", split_hash="s", git_commit=None, params_hash="p",
        tracking_uri=uri,
    )
    print(version, f1, decision.decision, flush=True)
    """
)


def test_concurrent_registrations_leave_the_best_version_champion(store: Store, tmp_path: Path) -> None:
    """Real processes register versions of F1 0.3, 0.5, 0.4 at the same moment; the gate decides them one at a
    time, so the best one is champion whatever the order, and every decision was made against the champion of
    that moment."""
    name, go = "race", tmp_path / "go"
    scores = (0.3, 0.5, 0.4)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store.uri, store.models["blank"], name, str(f1), str(go)],
            cwd=REPO,
            env={**os.environ, "MLFLOW_TRACKING_URI": store.uri},  # MLflow resolves the model's source there
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f1 in scores
    ]
    time.sleep(0.5)
    go.touch()
    outputs = [racer.communicate(timeout=240) for racer in racers]
    assert all(r.returncode == 0 for r in racers), [err[-2000:] for _, err in outputs]
    by_version = {}
    for out, _ in outputs:
        version, f1, decision = out.split()[-3:]
        by_version[version] = (float(f1), decision)
    best = max(by_version, key=lambda v: by_version[v][0])
    assert registry.registry_state(name, tracking_uri=store.uri)["aliases"][CHAMPION] == best
    # In registration order, a version was promoted exactly when it beat every version before it.
    running = -1.0
    for version in sorted(by_version, key=int):
        f1, decision = by_version[version]
        assert decision == ("promoted" if f1 > running else "rejected"), by_version
        running = max(running, f1)
