"""The model registry: versions of the trained model, the ``challenger`` and ``champion`` aliases, the promotion gate.

Definitions (MLflow 3 registry, aliases only; stages are deprecated and never used):

- **version**: one registered copy of a logged model, tagged with where it came from (``dataset_hash``,
  ``split_hash``, ``git_commit``, ``params_hash``) and the test figures the gate compares, flattened to
  ``test.<group>.<figure>`` (``test.all.f1``, ``test.all.dice``: ``nucleiseg register`` records the gate's metric
  and tie breaker; every test figure is a metric of the logged model, ``test/all/f1``, see nucleiseg.lineage).
  ``split_hash`` names the test split those figures were measured on. A version that lacks a figure the gate
  compares (the gate's metric was changed since) is scored again, like a version of another split.
- **challenger**: the alias of the most recently registered version, the candidate.
- **champion**: the alias of the version batch inference serves (``models:/<name>@champion``).
- **the gate** (:func:`promote_challenger`): the challenger takes ``champion`` only when its score on the current
  test split beats the champion's on the same split: ``metric`` first, ``tie_breaker`` on a tie. Only figures with
  a known direction can decide (:func:`metric_direction`: F1, precision, recall, Dice, AJI, PQ, DQ, SQ, accuracy,
  PQ+ and mPQ+ are better higher, the Hausdorff distance lower; counts such as ``all.fp`` are refused). A NaN score
  never beats a number, an equal model never replaces the champion, and with no champion yet the challenger
  becomes champion. A version whose figures come from another split is evaluated again, now, by the ``evaluate``
  callable the caller supplies (it receives ``models:/<name>/<version>`` and returns the nested summary of
  ``nucleiseg evaluate``); its tags are updated and marked ``reevaluated.*``. Without an evaluator such a version
  cannot be compared and the champion stays. Before a version takes ``champion``, the ``check`` callable the caller
  supplies (a smoke test: load the model, predict a tile) must pass. The decision is recorded as ``promotion.*``
  tags on the challenger, and the replaced champion is tagged ``promotion.replaced_by``.
- **a failed gate changes nothing**: the gate decides first (every evaluation, every check) and writes after, so an
  evaluation or check that fails raises :class:`RegistryError` with every tag and alias as it was.
- **one decision at a time**: registering a version and deciding on it (:func:`register_and_promote`), the gate and
  a manual promotion hold an exclusive lock on the registry (:func:`registry_lock`: a lock file beside a local
  SQLite or file store; for a remote tracking server, a lock file in the user's cache, which serialises the
  registrations made from this machine only). Two registrations at once are thereby decided one after the other,
  each against the champion the other left, and each on the version it registered (not on whichever holds
  ``challenger`` at that moment).
- **leakage**: a version records the images it was trained and validated on (tag ``trained_on``, when the
  names fit in a tag). Its score on a test split that holds any of them is not a test score: when the gate is
  given the current test images, a challenger that saw some of them is rejected, and a champion that saw some
  of them cannot defend its title with that score: a clean challenger replaces it. Versions that recorded no
  names are compared as before.

Functions take an optional ``tracking_uri`` (the registry lives in the same store); without one they use the
current MLflow configuration (see :func:`nucleiseg.tracking.configure`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHALLENGER = "challenger"
CHAMPION = "champion"
METRIC_PREFIX = "test."
# Per-group figures of nucleiseg.metrics (groups all, tumor, lymphocyte, stroma) by the direction that is better.
HIGHER_IS_BETTER = frozenset({"f1", "precision", "recall", "dice", "aji", "pq", "dq", "sq"})
LOWER_IS_BETTER = frozenset({"hausdorff"})
LOCK_TIMEOUT_S = 3600.0  # a gate that re-scores models on a large split can take long; beyond this, give up
# Summary entries that are bookkeeping rather than figures; not copied to tags.
_SKIPPED_KEYS = frozenset({"nan_skipped"})
TRAINED_ON = "trained_on"
# MLflow limits a tag value (8,000 characters in MLflow 3); longer name lists are not recorded.
TRAINED_ON_MAX_CHARS = 7500

Evaluator = Callable[[str], Mapping[str, Any]]
Checker = Callable[[str], None]  # a smoke test of the model at a URI; raises when it cannot serve


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no such model, version or alias; unusable figures)."""


@dataclass(frozen=True)
class Decision:
    """What the gate (or a manual promotion) decided, and why.

    ``decision`` is ``promoted``, ``rejected``, ``manual`` or ``unchanged`` (the version already was champion).
    ``scores`` maps ``"challenger"`` / ``"champion"`` to the compared figures (``{metric: value}``) on the
    current split; ``reevaluated`` lists the versions that were evaluated again because their split differed.
    """

    promoted: bool
    challenger: str
    champion_before: str | None
    reason: str
    scores: dict[str, dict[str, float]]
    decision: str = "rejected"
    reevaluated: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN scores become ``None``."""
        out = asdict(self)
        out["scores"] = {
            who: {k: (None if math.isnan(v) else v) for k, v in figures.items()} for who, figures in self.scores.items()
        }
        out["reevaluated"] = list(self.reevaluated)
        return out


# ----------------------------------------------------------------------------------------------------
# Helpers


def split_hash(path: str | os.PathLike[str]) -> str:
    """Hash of a split definition file (``splits.json``): sha256 of its bytes, 16 hex digits."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the split file ({exc.strerror or exc})") from exc
    return hashlib.sha256(data).hexdigest()[:16]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = METRIC_PREFIX) -> dict[str, str]:
    """Nested figures as registry tags: ``{"all": {"f1": 0.8}}`` -> ``{"test.all.f1": "0.8"}``.

    Scalars only (lists such as the confusion matrix stay in the metrics file); ``None`` (JSON's NaN)
    is stored as ``nan``. Floats use their shortest exact text, so a tag reads back as the same number.
    """
    flat: dict[str, str] = {}
    for key, value in metrics.items():
        if key in _SKIPPED_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif value is None:
            flat[name] = "nan"
        elif isinstance(value, bool):
            flat[name] = str(value).lower()
        elif isinstance(value, int | float):
            flat[name] = repr(float(value)) if isinstance(value, float) else str(value)
        # other values (lists, strings) are not figures to compare
    return flat


def lookup_metric(metrics: Mapping[str, Any], dotted: str) -> float:
    """The figure at ``dotted`` (``all.f1``) of a nested summary; NaN for ``None``; KeyError when absent."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    if node is None:
        return math.nan
    if isinstance(node, Mapping | list | str):
        raise KeyError(dotted)
    return float(node)


def metric_direction(dotted: str) -> str:
    """``"higher"`` or ``"lower"``: which value of the figure ``dotted`` (a key of the evaluation summary) is the
    better model. Raises :class:`ValueError` for counts and unknown names: the gate must not guess."""
    from nucleiseg.labels import CLASS_NAMES

    group, _, figure = dotted.partition(".")
    if dotted == "mpq_plus":
        return "higher"
    if group in ("all", *CLASS_NAMES) and figure in HIGHER_IS_BETTER | LOWER_IS_BETTER:
        return "lower" if figure in LOWER_IS_BETTER else "higher"
    if group == "classification" and figure in ("accuracy", *(f"accuracy_{c}" for c in CLASS_NAMES)):
        return "higher"
    if group == "pq_plus" and figure in CLASS_NAMES:
        return "higher"
    raise ValueError(
        f"{dotted!r} is not a figure with a known direction (counts and unknown names cannot rank models); use "
        f"<group>.<figure> with group all, {', '.join(CLASS_NAMES)} and figure {', '.join(sorted(HIGHER_IS_BETTER))}"
        ", hausdorff (lower is better); classification.accuracy[_<class>]; pq_plus.<class>; or mpq_plus"
    )


def registry_lock_path(tracking_uri: str | None = None) -> Path:
    """The lock file that serialises the registry's decisions (see "one decision at a time")."""
    import mlflow

    uri = tracking_uri or mlflow.get_registry_uri()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return database.with_name(database.name + ".gate.lock")
    if uri.startswith("file:"):
        return Path(urlparse(uri).path) / ".gate.lock"
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:  # a plain local path
        return Path(uri) / ".gate.lock"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nucleiseg"
    return cache / f"registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def registry_lock(tracking_uri: str | None = None, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry's exclusive lock (:func:`registry_lock_path`) for one decision."""
    from filelock import FileLock, Timeout

    path = registry_lock_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(path, timeout=timeout):
            yield
    except Timeout:
        raise RegistryError(f"{path}: the registry stayed locked for {timeout:.0f} s by another decision") from None


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    if tracking_uri is None:
        return MlflowClient()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None when the alias is unset (a missing model is an error)."""
    aliases = _registered(client, name).aliases
    version = aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def _registered(client: MlflowClient, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model {name!r}; register a version first") from exc
        raise


def _version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    _registered(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r} has no version {version}") from exc
        raise


def _tag_score(tags: Mapping[str, str], metric: str) -> float:
    raw = tags.get(METRIC_PREFIX + metric)
    if raw is None:
        return math.nan
    try:
        return float(raw)
    except ValueError:
        return math.nan


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


def _source_run(client: MlflowClient, model_uri: str) -> tuple[str, str | None, str | None]:
    """(source, run id, logged-model id) of a model URI: ``models:/<model_id>`` (MLflow 3 logged models),
    ``runs:/<run>/<name>`` (resolved to the logged model of that run) or a local path / artifact URI."""
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name.strip('/')}'",
        )
        if not found:
            raise RegistryError(f"{model_uri}: run {run_id} logged no model named {name!r}")
        model_id = found[0].model_id
        return f"models:/{model_id}", run_id, model_id
    if model_uri.startswith("models:/m-") and "/" not in model_uri.removeprefix("models:/"):
        model_id = model_uri.removeprefix("models:/")
        return model_uri, client.get_logged_model(model_id).source_run_id, model_id
    return model_uri, None, None


# ----------------------------------------------------------------------------------------------------
# Registering


def register_model(
    model_uri: str,
    name: str,
    test_metrics: Mapping[str, Any],
    dataset_hash: str,
    split_hash: str,
    git_commit: str | None,
    params_hash: str,
    run_id: str | None = None,
    trained_on: Sequence[str] | None = None,
    *,
    figures: Sequence[str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Add ``model_uri`` as a new version of ``name`` (created if needed), tagged with its provenance and
    flattened test figures, and give it the ``challenger`` alias. Returns the version number (as text).

    ``figures``: which figures of ``test_metrics`` become tags (``("all.f1", "all.dice")``, the gate's);
    None: all of them.

    ``trained_on``: the names of the images the model was trained and validated on, recorded for the gate's
    leakage check (see the module docstring) when they fit in a tag; their number is recorded in any case.

    ``model_uri`` is the URI ``log_model`` returned (``models:/m-...``), a ``runs:/<run>/<name>`` URI, or a
    path to a saved MLflow model. The version is linked to the run that logged the model; ``run_id`` is used
    when the URI does not name one.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(
            name, description="Nuclei segmentation and classification (nucleiseg); see version tags."
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source, source_run_id, model_id = _source_run(client, model_uri)
    flat = flatten_metrics(test_metrics)
    if figures is not None:
        flat = {k: v for k, v in flat.items() if k.removeprefix(METRIC_PREFIX) in figures}
    tags = {
        **flat,
        "dataset_hash": dataset_hash,
        "split_hash": split_hash,
        "git_commit": git_commit or "unknown",
        "params_hash": params_hash,
        "registered.time": _now(),
        **_trained_on_tags(trained_on),
    }
    if model_id is not None:
        import mlflow

        # mlflow.register_model also records the version on the LoggedModel (its mlflow.modelVersions tag): the
        # UI then shows the logged model as registered and links the version page to it, which
        # MlflowClient.create_model_version does not do. The version's run is the LoggedModel's source run.
        with _store_in_force(tracking_uri):
            version = mlflow.register_model(source, name, tags=tags).version
    else:  # a model folder or artifact URI: no LoggedModel to link
        version = client.create_model_version(name, source, run_id=source_run_id or run_id, tags=tags).version
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    return str(version)


@contextlib.contextmanager
def _store_in_force(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's fluent API pointed at ``tracking_uri`` (tracking and registry) for the block, then back; nothing
    changes when it is None or already in force (``mlflow.register_model`` has no store argument)."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if tracking_uri is None or before == (tracking_uri, tracking_uri):
        yield
        return
    from nucleiseg.tracking import use_store

    use_store(tracking_uri, tracking_uri)
    try:
        yield
    finally:
        use_store(*before)


def _trained_on_tags(names: Sequence[str] | None) -> dict[str, str]:
    if names is None:
        return {}
    unique = sorted(set(names))
    joined = ",".join(unique)
    tags = {f"{TRAINED_ON}.count": str(len(unique))}
    if any("," in n for n in unique) or len(joined) > TRAINED_ON_MAX_CHARS:
        return tags  # not recordable as one tag: the gate cannot check this version
    return {**tags, TRAINED_ON: joined}


def trained_on(mv: ModelVersion) -> frozenset[str] | None:
    """The images version ``mv`` was trained and validated on, or None when it did not record them."""
    value = mv.tags.get(TRAINED_ON)
    if value is None:
        return None
    return frozenset(n for n in value.split(",") if n)


def _leaked(mv: ModelVersion, test_images: frozenset[str] | None) -> list[str]:
    """The current test images that ``mv`` saw in training or validation (sorted; empty when unknown)."""
    seen = trained_on(mv)
    if test_images is None or seen is None:
        return []
    return sorted(seen & test_images)


def _names(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def registry_state(name: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The registered model at a glance: its aliases (``{alias: version}``) and latest version."""
    client = _client(tracking_uri)
    model = _registered(client, name)
    latest = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    return {
        "name": name,
        "aliases": {alias: str(v) for alias, v in sorted(model.aliases.items())},
        "latest_version": str(latest[0].version) if latest else None,
    }


# ----------------------------------------------------------------------------------------------------
# Promotion


@dataclass
class _Writes:
    """Tag changes the gate decided on, applied only once the whole decision stands (see "a failed gate")."""

    tags: list[tuple[str, str, str]] = field(default_factory=list)  # (version, key, value)
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (version, key)

    def apply(self, client: MlflowClient, name: str) -> None:
        for version, key in self.deleted:
            client.delete_model_version_tag(name, version, key)
        for version, key, value in self.tags:
            client.set_model_version_tag(name, version, key, value)


def _scores_now(
    name: str,
    mv: ModelVersion,
    keys: tuple[str, ...],
    current_split: str | None,
    evaluate: Evaluator | None,
    writes: _Writes,
) -> tuple[dict[str, float] | None, bool]:
    """The figures of ``mv`` on the current split, evaluating it again when its split differs.

    Returns ``(scores, reevaluated)``; ``scores`` is None when the split differs and there is no evaluator. The
    new figures are added to ``writes``, not written. An evaluation that fails raises :class:`RegistryError`.
    """
    tags = dict(mv.tags)
    recorded_split = tags.get("split_hash")
    missing = [k for k in keys if METRIC_PREFIX + k not in tags]  # a figure it did not record: score it now
    if (current_split is None or recorded_split == current_split) and not (missing and evaluate is not None):
        return {k: _tag_score(tags, k) for k in keys}, False
    if evaluate is None:
        return None, False
    uri = f"models:/{name}/{mv.version}"
    try:
        fresh = evaluate(uri)
    except Exception as exc:  # loading and running a stored model can fail in any way; the gate must not
        raise RegistryError(
            f"cannot score {uri} on the current split {current_split} ({type(exc).__name__}: {exc}); "
            "the gate changed nothing"
        ) from None
    try:
        scores = {k: lookup_metric(fresh, k) for k in keys}
    except KeyError as exc:
        raise RegistryError(f"the evaluation of {uri} has no figure {exc.args[0]!r}") from None
    # the figures it recorded and the ones compared now, no more (all figures are on the logged model)
    recorded = {k for k in tags if k.startswith(METRIC_PREFIX)} | {METRIC_PREFIX + k for k in keys}
    new_tags = {k: v for k, v in flatten_metrics(fresh).items() if k in recorded}
    version = str(mv.version)
    # figures from the old split would mislead next to the new ones
    writes.deleted += [(version, k) for k in tags if k.startswith(METRIC_PREFIX) and k not in new_tags]
    new_tags.update(
        {"split_hash": current_split, "reevaluated.from_split": recorded_split or "unknown", "reevaluated.time": _now()}
    )
    writes.tags += [(version, k, v) for k, v in new_tags.items()]
    return scores, True


def _compare(new: Mapping[str, float], old: Mapping[str, float], metric: str, tie_breaker: str) -> tuple[bool, str]:
    """Whether ``new`` beats ``old`` (metric, then tie breaker), and in words why."""
    for key in dict.fromkeys((metric, tie_breaker)):
        a, b = new[key], old[key]
        lower = metric_direction(key) == "lower"
        if math.isnan(a) and math.isnan(b):
            continue
        if math.isnan(a):
            return False, f"its {key} is NaN, which never beats a number"
        if math.isnan(b):
            return True, f"the champion's {key} is NaN and its own is a number"
        if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            continue
        better = a < b if lower else a > b
        direction = "lower" if lower else "higher"
        if key == metric:
            verdict = "better" if better else "worse"
            return better, f"{key} {_fmt(a)} vs {_fmt(b)} is {verdict} ({direction} is better)"
        verdict = "wins" if better else "loses"
        return (
            better,
            f"tie on {metric}; the tie breaker {key} {_fmt(a)} vs {_fmt(b)} {verdict} ({direction} is better)",
        )
    return False, f"tie on {metric} and {tie_breaker}: an equal model does not replace the champion"


def _describe(label: str, version: str, scores: Mapping[str, float]) -> str:
    return f"{label} v{version} " + ", ".join(f"{k}={_fmt(v)}" for k, v in scores.items())


def _record(
    client: MlflowClient,
    name: str,
    decision: Decision,
    split: str | None,
    metric: str | None,
    writes: _Writes,
    by: str | None = None,
) -> None:
    """Add the decision to ``writes``: ``promotion.*`` tags on the challenger; a replaced champion's tags."""
    now = _now()
    version = decision.challenger
    tags = {
        "promotion.decision": decision.decision,
        "promotion.reason": decision.reason,
        "promotion.compared_to": decision.champion_before or "none",
        "promotion.time": now,
    }
    if metric is not None:
        tags["promotion.metric"] = metric
    if split is not None:
        tags["promotion.split_hash"] = split
    if by is not None:
        tags["promotion.by"] = by
    # promotion.* tags from an earlier decision on this version would contradict this one; a rejected
    # version keeps the record that it once was replaced as champion.
    kept = set(tags) | (set() if decision.promoted else {"promotion.replaced_by", "promotion.replaced_time"})
    for key in client.get_model_version(name, version).tags:
        if key.startswith("promotion.") and key not in kept:
            writes.deleted.append((version, key))
    writes.tags += [(version, key, value) for key, value in tags.items()]
    if decision.promoted and decision.champion_before is not None:
        writes.tags += [
            (decision.champion_before, "promotion.replaced_by", version),
            (decision.champion_before, "promotion.replaced_time", now),
        ]


def _smoke_test(check: Checker | None, name: str, version: str) -> None:
    if check is None:
        return
    uri = f"models:/{name}/{version}"
    try:
        check(uri)
    except Exception as exc:  # a model that cannot serve, whatever the reason, must not take the alias
        raise RegistryError(
            f"{uri} failed its smoke test ({type(exc).__name__}: {exc}); it cannot take {CHAMPION!r}, "
            "the gate changed nothing"
        ) from None


def _check_metrics(metric: str, tie_breaker: str) -> tuple[str, ...]:
    for key in (metric, tie_breaker):
        try:
            metric_direction(key)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
    return tuple(dict.fromkeys((metric, tie_breaker)))


def promote_challenger(
    name: str,
    metric: str = "all.f1",
    tie_breaker: str = "all.dice",
    split_hash: str | None = None,
    evaluate: Evaluator | None = None,
    test_images: Sequence[str] | None = None,
    *,
    version: str | int | None = None,
    check: Checker | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Run the promotion gate on a version of ``name`` (see the module docstring), under the registry's lock.

    ``version``: the version to decide on (default: the one holding ``challenger``). ``split_hash`` is the current
    test split (None: trust the recorded figures without checking their split). ``evaluate(model_uri) -> nested
    summary`` scores a version on the current split when its recorded split differs. ``test_images`` (the current
    test split's image names) turns on the leakage check. ``check(model_uri)`` smoke-tests a version before it
    takes ``champion``. The decision is returned and recorded as ``promotion.*`` tags on the challenger; when
    anything fails, :class:`RegistryError` is raised and nothing is written.
    """
    with registry_lock(tracking_uri):
        return _gate(
            _client(tracking_uri), name, metric, tie_breaker, split_hash, evaluate, test_images, version, check
        )


def _gate(
    client: MlflowClient,
    name: str,
    metric: str,
    tie_breaker: str,
    split_hash: str | None,
    evaluate: Evaluator | None,
    test_images: Sequence[str] | None,
    version: str | int | None,
    check: Checker | None,
) -> Decision:
    """:func:`promote_challenger` with the lock held: decide, then write."""
    keys = _check_metrics(metric, tie_breaker)
    if version is None:
        challenger = _by_alias(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"registered model {name!r} has no {CHALLENGER!r} version; run `nucleiseg register`")
    else:
        challenger = _version(client, name, version)
    champion = _by_alias(client, name, CHAMPION)
    new_v = str(challenger.version)
    old_v = None if champion is None else str(champion.version)
    uses_recorded = split_hash is None or challenger.tags.get("split_hash") == split_hash
    if uses_recorded and METRIC_PREFIX + metric not in challenger.tags and evaluate is None:
        recorded = sorted(k.removeprefix(METRIC_PREFIX) for k in challenger.tags if k.startswith(METRIC_PREFIX))
        raise RegistryError(
            f"version {new_v} of {name!r} has no figure {metric!r} (recorded: {', '.join(recorded) or 'none'})"
        )
    if old_v == new_v:
        scores = {"challenger": {k: _tag_score(challenger.tags, k) for k in keys}}
        return Decision(False, new_v, old_v, f"v{new_v} already is the champion", scores, "unchanged")

    writes = _Writes()
    tested = None if test_images is None else frozenset(test_images)
    new_leak = _leaked(challenger, tested)
    old_leak = [] if champion is None else _leaked(champion, tested)
    if new_leak:
        decision = Decision(
            False,
            new_v,
            old_v,
            f"challenger v{new_v} was trained or validated on {len(new_leak)} image(s) of the current test split "
            f"({_names(new_leak)}): its figures are not a test; "
            + (f"champion v{old_v} stays" if old_v else "no champion is set"),
            {},
            "rejected",
        )
        _record(client, name, decision, split_hash, metric, writes)
        writes.apply(client, name)
        return decision
    new_scores, new_re = _scores_now(name, challenger, keys, split_hash, evaluate, writes)
    reevaluated = (new_v,) if new_re else ()
    figures = new_scores or {k: _tag_score(challenger.tags, k) for k in keys}  # when no comparison is needed
    if old_leak:
        decision = Decision(
            True,
            new_v,
            old_v,
            f"champion v{old_v} was trained or validated on {len(old_leak)} image(s) of the current test split "
            f"({_names(old_leak)}), so its score there is not comparable; {_describe('challenger', new_v, figures)}"
            f", which did not see them, is promoted over champion v{old_v}",
            {"challenger": figures},
            "promoted",
            reevaluated,
        )
    elif champion is None:
        note = "" if new_scores is not None else f" (its figures are from split {challenger.tags.get('split_hash')})"
        decision = Decision(
            True,
            new_v,
            None,
            f"no champion yet: {_describe('challenger', new_v, figures)} becomes champion{note}",
            {"challenger": figures},
            "promoted",
            reevaluated,
        )
    else:
        old_scores, old_re = _scores_now(name, champion, keys, split_hash, evaluate, writes)
        reevaluated += (old_v,) if old_re else ()
        stale = [
            f"v{mv.version} was scored on split {mv.tags.get('split_hash', 'unknown')}"
            for mv, s in ((challenger, new_scores), (champion, old_scores))
            if s is None
        ]
        if stale:
            decision = Decision(
                False,
                new_v,
                old_v,
                f"cannot compare on the current split {split_hash}: {'; '.join(stale)}, and no evaluator was "
                f"given to score it again; champion v{old_v} stays",
                {},
                "rejected",
                reevaluated,
            )
        else:
            assert new_scores is not None and old_scores is not None
            better, why = _compare(new_scores, old_scores, metric, tie_breaker)
            outcome = f"promoted over champion v{old_v}" if better else f"rejected; champion v{old_v} stays"
            decision = Decision(
                better,
                new_v,
                old_v,
                f"{_describe('challenger', new_v, new_scores)}; {_describe('champion', old_v, old_scores)}: "
                f"{why}; {outcome}",
                {"challenger": new_scores, "champion": old_scores},
                "promoted" if better else "rejected",
                reevaluated,
            )
    if decision.promoted:
        _smoke_test(check, name, new_v)
    _record(client, name, decision, split_hash, metric, writes)
    # Everything is decided: now write, figures first, the alias last of the decision's facts.
    writes.apply(client, name)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, new_v)
    return decision


def register_and_promote(
    model_uri: str,
    name: str,
    test_metrics: Mapping[str, Any],
    dataset_hash: str,
    split_hash: str,
    git_commit: str | None,
    params_hash: str,
    run_id: str | None = None,
    trained_on: Sequence[str] | None = None,
    *,
    metric: str = "all.f1",
    tie_breaker: str = "all.dice",
    evaluate: Evaluator | None = None,
    test_images: Sequence[str] | None = None,
    check: Checker | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, Decision]:
    """:func:`register_model` then the gate on that very version, as one decision under the registry's lock.

    ``test_metrics`` must be the figures the caller measured itself on the split of ``split_hash`` (``nucleiseg
    register`` scores the model it registers). Returns ``(version, decision)``.
    """
    _check_metrics(metric, tie_breaker)
    with registry_lock(tracking_uri):
        version = register_model(
            model_uri, name, test_metrics, dataset_hash, split_hash, git_commit, params_hash, run_id, trained_on,
            figures=(metric, tie_breaker), tracking_uri=tracking_uri,
        )  # fmt: skip
        decision = _gate(
            _client(tracking_uri), name, metric, tie_breaker, split_hash, evaluate, test_images, version, check
        )
    return version, decision


def promote_version(
    name: str,
    version: str | int,
    reason: str = "manual",
    *,
    check: Checker | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Deliberately make ``version`` the champion, bypassing the comparison (not the smoke test ``check``);
    recorded as ``promotion.decision=manual`` with ``reason`` and, when ``USER`` is set, ``promotion.by``."""
    with registry_lock(tracking_uri):
        client = _client(tracking_uri)
        mv = _version(client, name, version)
        new_v = str(mv.version)
        champion = _by_alias(client, name, CHAMPION)
        old_v = None if champion is None else str(champion.version)
        if old_v == new_v:
            return Decision(False, new_v, old_v, f"v{new_v} already is the champion", {}, "unchanged")
        _smoke_test(check, name, new_v)
        by = os.environ.get("USER") or None
        who = f" by {by}" if by else ""
        replaced = f", replacing v{old_v}" if old_v else ""
        decision = Decision(True, new_v, old_v, f"manual promotion{who}{replaced}: {reason}", {}, "manual")
        writes = _Writes()
        _record(client, name, decision, None, None, writes, by=by)
        writes.apply(client, name)
        client.set_registered_model_alias(name, CHAMPION, new_v)
    return decision


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Checker",
    "Decision",
    "Evaluator",
    "RegistryError",
    "flatten_metrics",
    "lookup_metric",
    "metric_direction",
    "promote_challenger",
    "promote_version",
    "register_and_promote",
    "register_model",
    "registry_lock",
    "registry_lock_path",
    "registry_state",
    "split_hash",
]
