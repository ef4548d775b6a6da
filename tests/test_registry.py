"""The model registry and the promotion gate, on a real MLflow SQLite store (no mocks).

One store and one logged model serve the whole module (creating an MLflow SQLite store and logging a
PyTorch model take seconds); each test registers versions under its own model name, so tests do not
see each other's aliases or tags.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nucleiseg import registry, tracking
from nucleiseg.registry import CHALLENGER, CHAMPION, Decision, RegistryError

EXAMPLE = np.linspace(0, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)


class Store:
    def __init__(self, root: Path, uri: str, model_uri: str, run_id: str, reference_output: np.ndarray) -> None:
        self.root, self.uri, self.model_uri, self.run_id = root, uri, model_uri, run_id
        self.reference_output = reference_output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store must be this one, never the user's
        tracking.configure(uri, "registry-tests", root / "artifacts")
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 5, 1)
        with torch.no_grad():
            reference = model(torch.from_numpy(EXAMPLE)).numpy()
        with mlflow.start_run() as run:
            info = tracking.log_pytorch_model(model, EXAMPLE, metadata={"norm_mean": [0.5, 0.5, 0.5]})
        yield Store(root, uri, info.model_uri, run.info.run_id, reference)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _summary(f1: float | None, dice: float | None = 0.7, hausdorff: float = 5.0) -> dict[str, Any]:
    """The shape of ``nucleiseg evaluate``'s summary (the parts the registry reads, plus non-figures)."""
    return {
        "all": {"f1": f1, "dice": dice, "hausdorff": hausdorff, "tp": 10, "nan_skipped": {"f1": 0}},
        "tumor": {"f1": 0.5, "dice": 0.6},
        "classification": {"accuracy": 0.8, "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
        "n_images": 2,
    }


def _register(store: Store, name: str, f1: float | None, dice: float | None = 0.7, split: str = "split-a") -> str:
    return registry.register_model(
        store.model_uri,
        name,
        _summary(f1, dice),
        dataset_hash="data-1",
        split_hash=split,
        git_commit="abc123",
        params_hash="p-1",
        tracking_uri=store.uri,
    )


def _tags(store: Store, name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient(store.uri, store.uri).get_model_version(name, version).tags)


def _aliases(store: Store, name: str) -> dict[str, str]:
    return registry.registry_state(name, tracking_uri=store.uri)["aliases"]


def _gate(store: Store, name: str, split: str | None = "split-a", evaluate: Any = None, **kw: Any) -> Decision:
    return registry.promote_challenger(name, split_hash=split, evaluate=evaluate, tracking_uri=store.uri, **kw)


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def test_flatten_metrics_keeps_figures_as_exact_text() -> None:
    flat = registry.flatten_metrics(_summary(0.1 + 0.2, None))
    assert flat["test.all.f1"] == repr(0.1 + 0.2) and float(flat["test.all.f1"]) == 0.1 + 0.2
    assert flat["test.all.dice"] == "nan"  # JSON null (an undefined figure) reads back as NaN
    assert flat["test.all.tp"] == "10" and flat["test.n_images"] == "2"
    assert flat["test.classification.accuracy"] == "0.8"
    assert not any("confusion" in k or "nan_skipped" in k for k in flat)


def test_lookup_metric() -> None:
    summary = _summary(0.5, None)
    assert registry.lookup_metric(summary, "all.f1") == 0.5
    assert math.isnan(registry.lookup_metric(summary, "all.dice"))
    with pytest.raises(KeyError):
        registry.lookup_metric(summary, "all.f2")
    with pytest.raises(KeyError):
        registry.lookup_metric(summary, "classification.confusion")


def test_split_hash_reads_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"test": ["x"]}')
    b.write_text('{"test": ["y"]}')
    assert len(registry.split_hash(a)) == 16 and registry.split_hash(a) != registry.split_hash(b)
    with pytest.raises(RegistryError, match=r"missing\.json"):
        registry.split_hash(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------
# Registering and the gate


def test_register_tags_provenance_and_sets_challenger(store: Store) -> None:
    from mlflow import MlflowClient

    version = _register(store, "reg", 0.5)
    assert version == "1"
    tags = _tags(store, "reg", version)
    assert tags["test.all.f1"] == "0.5" and tags["test.tumor.dice"] == "0.6"
    assert (tags["dataset_hash"], tags["split_hash"], tags["git_commit"], tags["params_hash"]) == (
        "data-1",
        "split-a",
        "abc123",
        "p-1",
    )
    assert _aliases(store, "reg") == {CHALLENGER: "1"}
    mv = MlflowClient(store.uri, store.uri).get_model_version("reg", version)
    assert mv.run_id == store.run_id  # linked to the run that logged the model
    assert _register(store, "reg", 0.6) == "2"
    assert _aliases(store, "reg") == {CHALLENGER: "2"}  # the alias moves to the newest version


def test_a_version_is_linked_to_its_logged_model(store: Store) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(store.uri, store.uri)
    model_id = store.model_uri.removeprefix("models:/")
    version = _register(store, "linked", 0.5)
    assert client.get_model_version("linked", version).source == store.model_uri  # the version names its model
    # ... and the LoggedModel lists the version (MLflow's own tag), which its page shows as "Registered".
    listed = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [str(entry["version"]) for entry in listed if entry["name"] == "linked"] == [version]


def test_gate_first_champion_then_better_promoted_then_worse_rejected(store: Store) -> None:
    name = "gate"
    v1 = _register(store, name, 0.5)
    first = _gate(store, name)
    assert first.promoted and first.champion_before is None and first.decision == "promoted"
    assert _aliases(store, name)[CHAMPION] == v1
    assert _tags(store, name, v1)["promotion.compared_to"] == "none"

    v2 = _register(store, name, 0.6)
    better = _gate(store, name)
    assert better.promoted and better.champion_before == v1 and better.challenger == v2
    assert better.scores == {
        "challenger": {"all.f1": 0.6, "all.dice": 0.7},
        "champion": {"all.f1": 0.5, "all.dice": 0.7},
    }
    assert _aliases(store, name) == {CHALLENGER: v2, CHAMPION: v2}
    tags = _tags(store, name, v2)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_to"] == v1
    assert "0.6" in tags["promotion.reason"] and "0.5" in tags["promotion.reason"]
    assert tags["promotion.metric"] == "all.f1" and tags["promotion.split_hash"] == "split-a"
    assert tags["promotion.time"]
    assert _tags(store, name, v1)["promotion.replaced_by"] == v2

    v3 = _register(store, name, 0.4)
    worse = _gate(store, name)
    assert not worse.promoted and worse.decision == "rejected" and worse.champion_before == v2
    assert _aliases(store, name) == {CHALLENGER: v3, CHAMPION: v2}
    tags = _tags(store, name, v3)
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_to"] == v2
    assert (
        "0.4" in tags["promotion.reason"] and "0.6" in tags["promotion.reason"] and "worse" in tags["promotion.reason"]
    )
    assert "promotion.replaced_by" not in _tags(store, name, v2)

    again = _gate(store, name)  # running the gate twice changes nothing
    assert not again.promoted and _aliases(store, name)[CHAMPION] == v2


@pytest.mark.parametrize(
    ("dice", "promoted"),
    [(0.8, True), (0.6, False), (0.7, False)],
    ids=["higher-dice-wins", "lower-dice-loses", "full-tie-keeps-champion"],
)
def test_tie_on_f1_is_broken_by_dice(store: Store, dice: float, promoted: bool) -> None:
    name = f"tie-{dice}"
    v1 = _register(store, name, 0.5, dice=0.7)
    _gate(store, name)
    v2 = _register(store, name, 0.5, dice=dice)
    decision = _gate(store, name)
    assert decision.promoted is promoted
    assert _aliases(store, name)[CHAMPION] == (v2 if promoted else v1)
    reason = _tags(store, name, v2)["promotion.reason"]
    assert ("tie" in reason) and ("all.dice" in reason)


def test_nan_never_beats_a_number(store: Store) -> None:
    name = "nan"
    v1 = _register(store, name, 0.2)
    _gate(store, name)
    _register(store, name, None)  # F1 undefined (JSON null)
    decision = _gate(store, name)
    assert not decision.promoted and math.isnan(decision.scores["challenger"]["all.f1"])
    assert _aliases(store, name)[CHAMPION] == v1
    assert "NaN" in _tags(store, name, decision.challenger)["promotion.reason"]
    assert json.loads(json.dumps(decision.to_dict()))["scores"]["challenger"]["all.f1"] is None

    # A number beats a NaN champion.
    name = "nan-champion"
    _register(store, name, None)
    _gate(store, name)
    v2 = _register(store, name, 0.1)
    assert _gate(store, name).promoted and _aliases(store, name)[CHAMPION] == v2


def test_lower_is_better_metric(store: Store) -> None:
    name = "hausdorff"
    registry.register_model(
        store.model_uri, name, _summary(0.5, hausdorff=6.0), "d", "s", None, "p", tracking_uri=store.uri
    )
    _gate(store, name, split="s", metric="all.hausdorff")
    v2 = registry.register_model(
        store.model_uri, name, _summary(0.4, hausdorff=4.0), "d", "s", None, "p", tracking_uri=store.uri
    )
    decision = _gate(store, name, split="s", metric="all.hausdorff")
    assert decision.promoted and _aliases(store, name)[CHAMPION] == v2
    assert _tags(store, name, v2)["git_commit"] == "unknown"


class FigureTable:
    """An evaluator: loads the version (proving the URI resolves) and reports figures from a table."""

    def __init__(self, figures: dict[str, float], reference: np.ndarray) -> None:
        self.figures, self.reference, self.calls = figures, reference, []

    def __call__(self, model_uri: str) -> dict[str, Any]:
        import mlflow

        self.calls.append(model_uri)
        model = mlflow.pytorch.load_model(model_uri)
        with torch.no_grad():
            assert np.allclose(model(torch.from_numpy(EXAMPLE)).numpy(), self.reference, atol=1e-6)
        version = model_uri.rsplit("/", 1)[-1]
        return _summary(self.figures[version], dice=0.7)


@pytest.mark.parametrize(
    ("fresh_f1", "promoted"), [(0.55, True), (0.65, False)], ids=["champion-drops", "champion-holds"]
)
def test_split_change_reevaluates_champion(store: Store, fresh_f1: float, promoted: bool) -> None:
    name = f"resplit-{fresh_f1}"
    v1 = _register(store, name, 0.9, split="old-split")  # looks better, but on another split
    _gate(store, name, split="old-split")
    v2 = _register(store, name, 0.6, split="new-split")
    evaluate = FigureTable({v1: fresh_f1}, store.reference_output)
    decision = _gate(store, name, split="new-split", evaluate=evaluate)

    assert evaluate.calls == [f"models:/{name}/{v1}"]  # only the version scored on another split
    assert decision.promoted is promoted and decision.reevaluated == (v1,)
    assert decision.scores["champion"]["all.f1"] == fresh_f1  # the fresh figure, not the recorded 0.9
    assert _aliases(store, name)[CHAMPION] == (v2 if promoted else v1)
    champion_tags = _tags(store, name, v1)
    assert champion_tags["test.all.f1"] == repr(fresh_f1) and champion_tags["split_hash"] == "new-split"
    assert champion_tags["reevaluated.from_split"] == "old-split" and champion_tags["reevaluated.time"]
    assert str(fresh_f1) in _tags(store, name, v2)["promotion.reason"]


def test_split_change_without_evaluator_keeps_champion(store: Store) -> None:
    name = "resplit-none"
    v1 = _register(store, name, 0.3, split="old-split")
    _gate(store, name, split="old-split")
    _register(store, name, 0.9, split="new-split")
    decision = _gate(store, name, split="new-split")
    assert not decision.promoted and _aliases(store, name)[CHAMPION] == v1
    assert "cannot compare" in decision.reason and "old-split" in decision.reason


def _register_for_gate(store: Store, name: str, summary: dict[str, Any], metric: str = "all.f1",
                       evaluate: Any = None) -> tuple[str, Decision]:  # fmt: skip
    return registry.register_and_promote(
        store.model_uri, name, summary, dataset_hash="data-1", split_hash="split-a", git_commit="abc123",
        params_hash="p-1", metric=metric, tie_breaker="all.dice", evaluate=evaluate, tracking_uri=store.uri,
    )  # fmt: skip


def test_a_registered_version_keeps_only_the_figures_the_gate_compares(store: Store) -> None:
    """Every test figure is a metric of the logged model (nucleiseg.lineage); the version's tags hold the gate's."""
    version, decision = _register_for_gate(store, "few-tags", _summary(0.5))
    tags = _tags(store, "few-tags", version)
    assert {k for k in tags if k.startswith("test.")} == {"test.all.f1", "test.all.dice"}
    assert {"dataset_hash", "split_hash", "git_commit", "params_hash"} <= tags.keys() and decision.promoted


def test_a_figure_the_champion_did_not_record_is_scored_again(store: Store) -> None:
    """promote.metric changed to the Hausdorff distance: the champion recorded only F1 and Dice, so it is scored
    now (not compared as NaN, which would always lose), and keeps the new figure as a tag."""
    name = "new-metric"
    v1, _ = _register_for_gate(store, name, _summary(0.5, hausdorff=4.0))
    evaluate = FigureTable({v1: 0.5}, store.reference_output)  # scores it with Hausdorff 5.0
    _, decision = _register_for_gate(store, name, _summary(0.5, hausdorff=6.0), "all.hausdorff", evaluate)
    assert evaluate.calls == [f"models:/{name}/{v1}"] and decision.reevaluated == (v1,)
    assert decision.scores == {"challenger": {"all.hausdorff": 6.0, "all.dice": 0.7},
                               "champion": {"all.hausdorff": 5.0, "all.dice": 0.7}}  # fmt: skip
    assert not decision.promoted and _aliases(store, name)[CHAMPION] == v1  # 6.0 is worse (lower is better)
    assert _tags(store, name, v1)["test.all.hausdorff"] == "5.0"


def _register_trained(store: Store, name: str, f1: float, trained_on: list[str]) -> str:
    return registry.register_model(
        store.model_uri,
        name,
        _summary(f1),
        dataset_hash="data-1",
        split_hash="split-a",
        git_commit="abc123",
        params_hash="p-1",
        trained_on=trained_on,
        tracking_uri=store.uri,
    )


def test_register_records_the_training_images(store: Store) -> None:
    version = _register_trained(store, "leak-tags", 0.5, ["b", "a", "a"])
    tags = _tags(store, "leak-tags", version)
    assert tags["trained_on"] == "a,b" and tags["trained_on.count"] == "2"
    many = [f"image_{i:05d}" for i in range(1000)]  # 11,999 characters: more than a tag holds
    tags = _tags(store, "leak-tags", _register_trained(store, "leak-tags", 0.5, many))
    assert "trained_on" not in tags and tags["trained_on.count"] == "1000"


def test_champion_trained_on_the_test_images_is_replaced(store: Store) -> None:
    """A re-split moved tile_2 from training to test: the champion's score there is not a test score."""
    name = "leak-champion"
    _register_trained(store, name, 0.9, ["tile_1", "tile_2"])
    assert _gate(store, name, test_images=["tile_3"]).promoted
    _register_trained(store, name, 0.5, ["tile_1", "tile_3"])
    decision = _gate(store, name, test_images=["tile_2", "tile_4"])
    assert decision.promoted and decision.decision == "promoted" and decision.champion_before == "1"
    assert "tile_2" in decision.reason and "not comparable" in decision.reason
    assert _aliases(store, name)[CHAMPION] == "2"
    assert _tags(store, name, "1")["promotion.replaced_by"] == "2"


def test_challenger_trained_on_the_test_images_is_rejected(store: Store) -> None:
    name = "leak-challenger"
    _register_trained(store, name, 0.5, ["tile_1"])
    assert _gate(store, name, test_images=["tile_9"]).promoted
    _register_trained(store, name, 0.99, ["tile_1", "tile_9"])
    decision = _gate(store, name, test_images=["tile_9"])
    assert not decision.promoted and decision.decision == "rejected"
    assert "tile_9" in decision.reason and "champion v1 stays" in decision.reason
    assert _aliases(store, name)[CHAMPION] == "1"
    assert _tags(store, name, "2")["promotion.decision"] == "rejected"
    # with no test images given, the leak cannot be seen, and the recorded figures decide as before
    assert _gate(store, name).promoted


def test_versions_without_training_images_are_compared_as_before(store: Store) -> None:
    name = "leak-unknown"
    _register(store, name, 0.5)
    assert _gate(store, name, test_images=["tile_1"]).promoted
    _register(store, name, 0.6)
    decision = _gate(store, name, test_images=["tile_1"])
    assert decision.promoted and "promoted over champion v1" in decision.reason


def test_manual_promotion_is_recorded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    name = "manual"
    v1 = _register(store, name, 0.6)
    _gate(store, name)
    v2 = _register(store, name, 0.4)
    assert not _gate(store, name).promoted
    monkeypatch.setenv("USER", "pathologist")
    decision = registry.promote_version(name, v2, reason="better on our lab's stain", tracking_uri=store.uri)
    assert decision.promoted and decision.decision == "manual" and decision.champion_before == v1
    assert _aliases(store, name)[CHAMPION] == v2
    tags = _tags(store, name, v2)
    assert tags["promotion.decision"] == "manual" and tags["promotion.by"] == "pathologist"
    assert "better on our lab's stain" in tags["promotion.reason"] and tags["promotion.compared_to"] == v1
    assert "promotion.metric" not in tags  # left from the gate's rejection, which no longer applies
    assert _tags(store, name, v1)["promotion.replaced_by"] == v2
    assert registry.promote_version(name, v2, tracking_uri=store.uri).decision == "unchanged"
    with pytest.raises(RegistryError, match="no version 9"):
        registry.promote_version(name, 9, tracking_uri=store.uri)

    # The champion alias serves the model: the same weights come back.
    model = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}")
    with torch.no_grad():
        assert np.allclose(model(torch.from_numpy(EXAMPLE)).numpy(), store.reference_output, atol=1e-6)


def test_errors_name_the_problem(store: Store) -> None:
    with pytest.raises(RegistryError, match="no registered model 'absent'"):
        _gate(store, "absent")
    name = "bad-metric"
    _register(store, name, 0.5)
    with pytest.raises(RegistryError, match=r"'all\.f2'"):
        _gate(store, name, metric="all.f2")


def test_use_store_points_mlflow_without_exporting_it_to_child_processes(tmp_path: Path, monkeypatch) -> None:
    """``dvc repro`` started by the retraining flow must read its project's store, not one this process opened."""
    import os
    import subprocess
    import sys

    import mlflow

    from nucleiseg.tracking import use_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///the-users-registry.db")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    try:
        use_store(uri, uri)
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///the-users-registry.db"
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ.get('MLFLOW_TRACKING_URI'))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == "None"
    finally:
        use_store(*before)
