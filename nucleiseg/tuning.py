"""Hyperparameter search with Optuna over the loss settings: the perceptual weight and the weight map.

One *study* is a named set of trials in an Optuna storage; any number of processes, on one machine or
several, can add trials to it at once. Each process opens the study, starts trials, and at the end writes
the study's best settings (``best_params.yaml``), which :func:`apply_best_params` copies into a
``params.yaml``.

Definitions
-----------
search space
    ``w0`` and ``sigma`` (weight map, eq. 2) uniform in their ranges; ``beta`` (weight of the perceptual
    loss) uniform in its range. When the beta range starts at 0 the trial first draws a categorical
    ``perceptual`` switch: *off* trains with ``beta = 0`` exactly (no VGG16 at all, about 3x cheaper per step
    on CPU), *on* draws ``beta`` in the range. A uniform draw alone would never try the "no perceptual loss"
    configuration, which is the one the paper's ablation asks about. A range whose ends are equal fixes that
    value. The applied settings are ``train.beta``, ``loss.w0`` and ``loss.sigma``. With
    ``post.method: watershed`` the watershed's ``post.marker_threshold`` and ``post.mask_threshold`` are
    drawn too (uniform in ``tune.marker_threshold`` and ``tune.mask_threshold``), since the validation that
    scores a trial post-processes with them.
trial
    One training run from the base settings with the trial's values applied and ``train.epochs`` replaced
    by the tuning budget (``tune.epochs``), validated every ``train.val_every`` epochs on the validation
    split; its checkpoints go to a temporary folder that is deleted afterwards (the result of a study is
    its best settings, not a model: train with them).
objective
    ``val_<objective>`` (``f1`` by default; ``dice``, ``aji``, ``pq``, ``accuracy`` are maximised,
    ``hausdorff`` minimised) of the trial's best validated epoch, the epoch whose checkpoint a training run
    keeps. A trial whose figure is undefined at every epoch (no nucleus predicted) returns NaN, which Optuna
    records as a failed trial.
pruning
    After each validated epoch the figure is reported to Optuna as the intermediate value at
    ``step = epoch``; :class:`optuna.pruners.MedianPruner` stops a trial whose value is worse than the median
    of earlier trials at the same epoch, once ``startup_trials`` trials have finished and never within the
    first ``warmup_epochs`` epochs. A pruned trial keeps its curve in MLflow.
sampler
    TPE (multivariate) seeded with ``seed`` in the process that creates the study. A process that joins an
    existing study (a second worker, or a later session adding trials) derives its own seed from ``seed``,
    its host name and process id: identically seeded workers would propose the very same trials.
storage
    An RDB URL (``sqlite:///mlruns/optuna.db``, ``postgresql://...``) or the path of an Optuna journal file
    (ending ``.log`` or ``.journal``; :class:`optuna.storages.journal.JournalFileBackend`, safe for several
    processes on one machine or on a shared file system). SQLite connections wait up to 60 s for a lock, and
    RDB trials send heartbeats, so a killed worker's trial is marked failed instead of running forever.
tracking
    The study has one MLflow *parent* run (``tune-<study>``), created by the process that creates the study
    and found by the others through the study's user attribute ``mlflow_parent_run_id``. Every trial is a
    nested run under it (tag ``mlflow.parentRunId``) with its settings, its per-epoch metrics (the curve),
    its final score (``best_val_<objective>``) and its Optuna state. At the end of each process the parent
    receives the study's best settings, the trial table and the optimisation-history, intermediate-values
    and parameter-importance plots, so it reflects the study as of the last process to finish.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nucleiseg.io import atomic_path, write_text_atomic
from nucleiseg.params import Params

if TYPE_CHECKING:
    import optuna

OBJECTIVES: dict[str, str] = {
    "f1": "maximize",
    "dice": "maximize",
    "aji": "maximize",
    "pq": "maximize",
    "accuracy": "maximize",
    "hausdorff": "minimize",
}
"""Validation figures a study can optimise, with their direction."""

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the parent run ("" when the creator had no tracking)
OVERRIDES_ATTR = "overrides"  # trial user attribute: the settings the trial applied
RUN_ATTR = "mlflow_run_id"  # trial user attribute: its nested run
SQLITE_TIMEOUT_S = 60
PARENT_WAIT_S = 60.0
BEST_PARAMS_HEADER = (
    "# The best trial of an Optuna study, written by `nucleiseg tune`.\n"
    "# Apply the settings under `params` to params.yaml with: nucleiseg tune --apply [--params params.yaml]\n"
)


class TuningError(RuntimeError):
    """The study cannot run as asked (bad storage, mismatching study, no validation data); says what to fix."""


# ----------------------------------------------------------------------------------------------------
# Search space


@dataclass(frozen=True)
class SearchSpace:
    """Ranges ``(low, high)`` of the tuned settings; see the module docstring for how they are drawn."""

    beta: tuple[float, float] = (0.0, 1.0)
    w0: tuple[float, float] = (1.0, 20.0)
    sigma: tuple[float, float] = (1.0, 10.0)
    # the watershed's thresholds (None: not searched, as with the paper's post-processing)
    marker_threshold: tuple[float, float] | None = None
    mask_threshold: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        ranges = [("beta", self.beta), ("w0", self.w0), ("sigma", self.sigma)]
        ranges += [(name, r) for name, r in self._post_ranges()]
        for name, (low, high) in ranges:
            if not low <= high:
                raise ValueError(f"tune.{name}: the range [{low}, {high}] is empty")
        if self.beta[0] < 0 or self.w0[0] < 0 or self.sigma[0] <= 0:
            raise ValueError("tune ranges: beta and w0 must be >= 0 and sigma > 0")

    @property
    def perceptual_switch(self) -> bool:
        """Whether trials draw the on/off switch (the beta range starts at 0 and is not just 0)."""
        return self.beta[0] == 0 and self.beta[1] > 0

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """Draw one trial's settings; returns ``{"train.beta": ..., "loss.w0": ..., "loss.sigma": ...}``."""
        if self.perceptual_switch and not trial.suggest_categorical("perceptual", [True, False]):
            beta = 0.0
        else:
            beta = trial.suggest_float("beta", *self.beta)
        values = {
            "train.beta": float(beta),
            "loss.w0": float(trial.suggest_float("w0", *self.w0)),
            "loss.sigma": float(trial.suggest_float("sigma", *self.sigma)),
        }
        for name, bounds in self._post_ranges():
            values[f"post.{name}"] = float(trial.suggest_float(name, *bounds))
        return values

    def _post_ranges(self) -> list[tuple[str, tuple[float, float]]]:
        pairs = (("marker_threshold", self.marker_threshold), ("mask_threshold", self.mask_threshold))
        return [(name, bounds) for name, bounds in pairs if bounds is not None]

    def as_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in asdict(self).items() if values is not None}


def apply_overrides(params: Params, values: Mapping[str, Any]) -> Params:
    """A validated copy of ``params`` with dotted settings (``{"loss.w0": 5.0}``) replaced."""
    tree = params.model_dump(mode="json")
    for dotted, value in values.items():
        node = tree
        *sections, key = dotted.split(".")
        for section in sections:
            node = node[section]
        if key not in node:
            raise KeyError(f"{dotted}: no such setting")
        node[key] = value
    return Params.model_validate(tree)


# ----------------------------------------------------------------------------------------------------
# Storage and study


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL or a journal file path (see the module docstring)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" not in storage:
        path = Path(storage)
        if path.suffix not in (".log", ".journal"):
            raise TuningError(
                f"tune.storage {storage!r}: expected an RDB URL (sqlite:///mlruns/optuna.db, postgresql://...) "
                "or an Optuna journal file path ending in .log or .journal"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    # Two processes opening a new database both try to create its tables; the loser retries on the created schema.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, stable in use
                return optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180
                )
        except Exception as exc:  # sqlalchemy OperationalError / IntegrityError during schema creation
            if attempt == 4 or type(exc).__module__.split(".")[0] != "sqlalchemy":
                raise TuningError(f"tune.storage {redact(storage)}: cannot open ({exc})") from exc
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def redact(storage: str) -> str:
    """The storage URL without its password, for logs and tags."""
    if "://" not in storage or "@" not in storage:
        return storage
    scheme, rest = storage.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def worker_seed(seed: int) -> int:
    """A seed for a process joining an existing study: ``seed`` mixed with the host name and process id."""
    return (seed * 1_000_003 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())) % 2**32


def make_pruner(startup_trials: int = 5, warmup_epochs: int = 1) -> optuna.pruners.BasePruner:
    """Median pruning on per-epoch validation figures; no pruning within the first ``warmup_epochs`` epochs."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)


def open_study(
    storage: str,
    study_name: str,
    objective: str,
    *,
    seed: int,
    space: SearchSpace,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool, int]:
    """Create the study, or join it when it exists; returns ``(study, created, sampler seed)``.

    Exactly one of several processes starting at once creates the study (the storage enforces unique
    names); the others join. Joining a study made for another objective is an error.
    """
    import optuna

    if objective not in OBJECTIVES:
        raise TuningError(f"tune.objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    direction = OBJECTIVES[objective]
    backend = open_storage(storage)
    pruner = pruner if pruner is not None else make_pruner()
    try:
        study = optuna.create_study(
            storage=backend,
            study_name=study_name,
            direction=direction,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        pass
    else:
        study.set_user_attr("objective", objective)
        study.set_user_attr("search_space", space.as_dict())
        return study, True, seed

    seed = worker_seed(seed)
    study = optuna.load_study(
        study_name=study_name, storage=backend, sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner
    )
    found = study.user_attrs.get("objective")
    if (found is not None and found != objective) or study.direction.name.lower() != direction:
        raise TuningError(
            f"study {study_name!r} in {redact(storage)} optimises {found or study.direction.name.lower()}, "
            f"not {objective}: choose another study name (--study)"
        )
    if study.user_attrs.get("search_space", space.as_dict()) != space.as_dict():
        warnings.warn(
            f"study {study_name!r} was created with the search space {study.user_attrs['search_space']}; "
            f"this process samples {space.as_dict()}",
            stacklevel=2,
        )
    return study, False, seed


# ----------------------------------------------------------------------------------------------------
# MLflow: the parent run and the nested trial runs


def configure_tracking(params: Params) -> str:
    """Point MLflow at the store in params; returns the experiment id (safe when two processes create it)."""
    from mlflow.exceptions import MlflowException

    from nucleiseg import tracking

    tp = params.tracking
    try:
        return tracking.configure(tp.uri, tp.experiment, tp.artifacts)
    except MlflowException:  # another process created the experiment between our lookup and our create
        return tracking.configure(tp.uri, tp.experiment, tp.artifacts)


def parent_run(
    study: optuna.Study,
    created: bool,
    experiment_id: str,
    *,
    params: Params,
    storage: str,
    objective: str,
    epochs: int,
    space: SearchSpace,
    wait_s: float = PARENT_WAIT_S,
) -> str:
    """The study's parent run id: created (and recorded on the study) by its creator, found by the others."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if not created:
        deadline = time.monotonic() + wait_s
        while (run_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the creator records it right after creating the study
        if run_id:
            try:
                client.get_run(run_id)
            except MlflowException:
                warnings.warn(
                    f"the parent run {run_id} of study {study.study_name!r} is not in this tracking store; "
                    "starting another one here",
                    stacklevel=2,
                )
            else:
                client.update_run(run_id, status="RUNNING")
                return run_id

    from nucleiseg import tracking

    run = client.create_run(
        experiment_id,
        run_name=f"tune-{study.study_name}",
        tags={
            "optuna.study_name": study.study_name,
            "optuna.storage": redact(storage),
            "tune.objective": f"val_{objective}",
            "tune.direction": OBJECTIVES[objective],
            "git_commit": tracking.git_commit() or "unknown",
            "params_hash": params.digest(),
        },
    )
    run_id = run.info.run_id
    flat = {k: ("null" if v is None else v) for k, v in params.flat().items() if not k.startswith("tune.")}
    flat.update({f"tune.{k}": v for k, v in space.as_dict().items()})
    flat.update({"tune.objective": objective, "tune.epochs": epochs})
    _log_params(client, run_id, flat)
    if not study.user_attrs.get(PARENT_RUN_ATTR):  # keep a parent that lives in another tracking store
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def _log_params(client: Any, run_id: str, values: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in values.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start : start + 100])


class _TrialRun:
    """One trial's nested MLflow run, written through the client (no global active-run state)."""

    def __init__(
        self, parent_run_id: str, experiment_id: str, trial: optuna.Trial, params: Params, overrides: Mapping
    ) -> None:
        import mlflow

        self.client = mlflow.MlflowClient()
        run = self.client.create_run(
            experiment_id,
            run_name=f"trial-{trial.number}",
            tags={
                "mlflow.parentRunId": parent_run_id,
                "optuna.study_name": trial.study.study_name,
                "optuna.trial_number": str(trial.number),
                "optuna.state": "RUNNING",
                "params_hash": params.digest(),
            },
        )
        self.run_id = run.info.run_id
        values = dict(params.flat())
        values.update({f"trial.{k}": v for k, v in trial.params.items()})
        _log_params(self.client, self.run_id, {k: ("null" if v is None else v) for k, v in values.items()})
        self.logged_epochs: set[int] = set()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        from nucleiseg.lineage import metric_name

        now = int(time.time() * 1000)
        # the names of a training run (train/loss, val/f1), so trials and runs compare side by side
        items = [
            Metric(metric_name(k), float(v), now, epoch)
            for k, v in metrics.items()
            if v is not None and not math.isnan(v)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)
        self.logged_epochs.add(epoch)

    def end(self, state: str, *, history: list[dict[str, float]] = (), score: dict[str, float] | None = None,
            error: str | None = None) -> None:  # fmt: skip
        for record in history:  # epochs without validation were not seen by the callback
            if record["epoch"] not in self.logged_epochs:
                self.log_epoch(int(record["epoch"]), {k: v for k, v in record.items() if k != "epoch"})
        if score:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in score.items()])
        self.client.set_tag(self.run_id, "optuna.state", state)
        if error:
            self.client.set_tag(self.run_id, "error", error[:4000])
        self.client.set_terminated(self.run_id, status="FAILED" if state == "FAIL" else "FINISHED")


# ----------------------------------------------------------------------------------------------------
# The objective


def best_value(history: list[dict[str, float]], key: str, direction: str) -> tuple[float, int]:
    """The best defined value of ``key`` over the epochs and its epoch; ``(nan, -1)`` when none is defined."""
    values = [(r[key], int(r["epoch"])) for r in history if key in r and not math.isnan(r[key])]
    if not values:
        return math.nan, -1
    pick = max if direction == "maximize" else min
    return pick(values, key=lambda v: v[0])


def make_objective(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    *,
    objective: str,
    epochs: int,
    space: SearchSpace,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    sampler_seed: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> Callable[[optuna.Trial], float]:
    """The Optuna objective: one training run of ``epochs`` epochs with the trial's settings (module docstring)."""
    import optuna

    from nucleiseg.train import train

    key = f"val_{objective}"
    direction = OBJECTIVES[objective]

    def run_trial(trial: optuna.Trial) -> float:
        overrides = space.suggest(trial)
        trial.set_user_attr(OVERRIDES_ATTR, overrides)
        if sampler_seed is not None:
            trial.set_user_attr("sampler_seed", sampler_seed)
        trial_params = apply_overrides(params, {**overrides, "train.epochs": epochs})
        run = None
        if parent_run_id is not None and experiment_id is not None:
            run = _TrialRun(parent_run_id, experiment_id, trial, trial_params, overrides)
            trial.set_user_attr(RUN_ATTR, run.run_id)
        if echo is not None:
            echo(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in overrides.items()))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if run is not None:
                run.log_epoch(epoch, metrics)
            value = metrics.get(key)
            if value is None or math.isnan(value):
                return  # undefined this epoch: nothing for the pruner to compare
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with {key} = {value:.4f}")

        with tempfile.TemporaryDirectory(prefix=f"nucleiseg-trial-{trial.number}-", dir=work_dir) as out:
            try:
                result = train(
                    trial_params, prepared_dir, out, track=False, progress=False, epoch_callback=on_epoch, echo=None
                )
            except optuna.TrialPruned:
                if run is not None:
                    run.end("PRUNED")
                raise
            except BaseException as exc:
                if run is not None:
                    run.end("FAIL", error=f"{type(exc).__name__}: {exc}")
                raise
        value, epoch = best_value(result.history, key, direction)
        trial.set_user_attr("best_epoch", epoch)
        trial.set_user_attr("seconds", round(result.seconds, 1))
        if run is not None:
            score = {f"best_{key}": value, "best_epoch": epoch} if not math.isnan(value) else {}
            run.end("COMPLETE" if not math.isnan(value) else "FAIL", history=result.history, score=score)
        return value

    return run_trial


# ----------------------------------------------------------------------------------------------------
# Results: best settings, summary, plots


@dataclass
class TuneSummary:
    """Where a study stands after this process's trials."""

    study: str
    storage: str
    objective: str
    direction: str
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    trials_here: list[int] = field(default_factory=list)
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, float] | None = None
    best_params_path: str | None = None
    parent_run_id: str | None = None
    artifacts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def trial_overrides(trial: optuna.trial.FrozenTrial, space: SearchSpace | None = None) -> dict[str, float]:
    """The settings a finished trial applied (recorded on it; rebuilt from its parameters otherwise)."""
    if OVERRIDES_ATTR in trial.user_attrs:
        return {k: float(v) for k, v in trial.user_attrs[OVERRIDES_ATTR].items()}
    p = trial.params
    beta = p.get("beta", 0.0) if p.get("perceptual", True) else 0.0
    values = {"train.beta": float(beta), "loss.w0": float(p["w0"]), "loss.sigma": float(p["sigma"])}
    values.update({f"post.{k}": float(p[k]) for k in ("marker_threshold", "mask_threshold") if k in p})
    return values


def best_params_document(study: optuna.Study, storage: str, epochs: int | None = None) -> dict[str, Any] | None:
    """The content of ``best_params.yaml`` for a study; None when no trial has completed."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    states = [t.state for t in study.get_trials(deepcopy=False)]
    objective = study.user_attrs.get("objective", "value")
    doc: dict[str, Any] = {
        "study": study.study_name,
        "storage": redact(storage),
        "objective": f"val_{objective}",
        "direction": study.direction.name.lower(),
        "value": float(best.value),
        "trial": best.number,
        "best_epoch": best.user_attrs.get("best_epoch"),
        "epochs_per_trial": epochs,
        "trials": {
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
        },
        "mlflow_run_id": best.user_attrs.get(RUN_ATTR),
        "params": trial_overrides(best),
    }
    return doc


def write_best_params(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write the best-settings document atomically, with a header saying how to apply it."""
    write_text_atomic(path, BEST_PARAMS_HEADER + yaml.safe_dump(dict(doc), sort_keys=False))


def summarize_study(
    study: optuna.Study,
    *,
    storage: str,
    best_out: str | os.PathLike[str] | None,
    parent_run_id: str | None = None,
    epochs: int | None = None,
    trials_here: list[int] | None = None,
) -> TuneSummary:
    """Write ``best_out`` (when a trial has completed) and give the parent run the study's results."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    objective = study.user_attrs.get("objective", "value")
    summary = TuneSummary(
        study=study.study_name,
        storage=redact(storage),
        objective=f"val_{objective}",
        direction=study.direction.name.lower(),
        n_trials=len(trials),
        n_complete=states.count(TrialState.COMPLETE),
        n_pruned=states.count(TrialState.PRUNED),
        n_failed=states.count(TrialState.FAIL),
        trials_here=list(trials_here or []),
        parent_run_id=parent_run_id,
    )
    doc = best_params_document(study, storage, epochs)
    if doc is not None:
        summary.best_value, summary.best_trial, summary.best_params = doc["value"], doc["trial"], doc["params"]
        if best_out is not None:
            write_best_params(best_out, doc)
            summary.best_params_path = str(best_out)
    if parent_run_id is not None:
        summary.artifacts = _log_study(study, parent_run_id, doc, summary)
    return summary


def _log_study(study: optuna.Study, run_id: str, doc: Mapping[str, Any] | None, summary: TuneSummary) -> list[str]:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = [
        Metric("n_trials", summary.n_trials, now, summary.n_trials),
        Metric("n_complete", summary.n_complete, now, summary.n_trials),
        Metric("n_pruned", summary.n_pruned, now, summary.n_trials),
        Metric("n_failed", summary.n_failed, now, summary.n_trials),
    ]
    if doc is not None:
        metrics.append(Metric(f"best_{summary.objective}", doc["value"], now, summary.n_trials))
        client.set_tag(run_id, "best_trial", str(doc["trial"]))
        if doc.get("mlflow_run_id"):
            client.set_tag(run_id, "best_trial_run_id", doc["mlflow_run_id"])
    client.log_batch(run_id, metrics=metrics)
    logged = []
    with tempfile.TemporaryDirectory(prefix="nucleiseg-study-") as tmp:
        folder = Path(tmp)
        if doc is not None:
            write_best_params(folder / "best_params.yaml", doc)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        for name, path in _plots(study, folder).items():
            if path is None:
                client.set_tag(run_id, f"plot.{name}", "not drawn: needs at least two completed trials that differ")
        for path in sorted(folder.iterdir()):
            client.log_artifact(run_id, str(path))
            logged.append(path.name)
    client.set_terminated(run_id, status="FINISHED")
    return logged


def _plots(study: optuna.Study, folder: Path) -> dict[str, Path | None]:
    """Optimisation history, intermediate values (the per-epoch curves) and parameter importances as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    drawn: dict[str, Path | None] = {}
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history": vis.plot_optimization_history,
        "intermediate_values": vis.plot_intermediate_values,
        "param_importances": vis.plot_param_importances,
    }
    for name, plot in plots.items():
        path = folder / f"{name}.png"
        if name == "param_importances" and (len(complete) < 2 or len({t.value for t in complete}) < 2):
            drawn[name] = None  # importance is undefined without at least two different outcomes
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # matplotlib: an empty legend when nothing completed
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. no parameter varies across trials
            drawn[name] = None
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=90, format="png")
        plt.close(figure)
        drawn[name] = path
    return drawn


# ----------------------------------------------------------------------------------------------------
# The whole search in one call


@dataclass
class StudySession:
    """This process's handle on a study: the opened study, its sampler seed and its MLflow parent run."""

    params: Params
    prepared_dir: str
    study: optuna.Study
    created: bool
    seed: int
    space: SearchSpace
    parent_run_id: str | None = None
    experiment_id: str | None = None


def start_session(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    *,
    track: bool = True,
    pruner: optuna.pruners.BasePruner | None = None,
) -> StudySession:
    """Check the data, open (or join) the study in ``params.tune`` and its MLflow parent run."""
    tune = params.tune
    watershed = params.post.method == "watershed"
    space = SearchSpace(
        tune.beta,
        tune.w0,
        tune.sigma,
        marker_threshold=tune.marker_threshold if watershed else None,
        mask_threshold=tune.mask_threshold if watershed else None,
    )
    check_prepared(prepared_dir)
    if pruner is None:
        pruner = make_pruner(tune.pruner_startup_trials, tune.pruner_warmup_epochs)
    study, created, seed = open_study(tune.storage, tune.study, tune.objective, seed=tune.seed, space=space,
                                      pruner=pruner)  # fmt: skip
    session = StudySession(params, str(prepared_dir), study, created, seed, space)
    if track:
        session.experiment_id = configure_tracking(params)
        session.parent_run_id = parent_run(
            study, created, session.experiment_id, params=params, storage=tune.storage, objective=tune.objective,
            epochs=tune.epochs, space=space,
        )  # fmt: skip
    elif created:
        study.set_user_attr(PARENT_RUN_ATTR, "")  # tells joining processes not to wait for a parent run
    return session


def run_trials(
    session: StudySession,
    n_trials: int,
    *,
    timeout: float | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[int]:
    """Run ``n_trials`` trials of the session's study in this process; returns their numbers."""
    tune = session.params.tune
    objective = make_objective(
        session.params, session.prepared_dir, objective=tune.objective, epochs=tune.epochs, space=session.space,
        parent_run_id=session.parent_run_id, experiment_id=session.experiment_id, work_dir=work_dir,
        sampler_seed=session.seed, echo=echo,
    )  # fmt: skip
    return optimize(session.study, objective, n_trials, timeout=timeout, echo=echo)


def finish_session(
    session: StudySession, best_out: str | os.PathLike[str] | None, trials_here: list[int] | None = None
) -> TuneSummary:
    """Write the best settings and give the parent run the study's results (:func:`summarize_study`)."""
    tune = session.params.tune
    return summarize_study(
        session.study, storage=tune.storage, best_out=best_out, parent_run_id=session.parent_run_id,
        epochs=tune.epochs, trials_here=trials_here,
    )  # fmt: skip


def run_tuning(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    *,
    n_trials: int | None = None,
    best_out: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    track: bool = True,
    pruner: optuna.pruners.BasePruner | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> TuneSummary:
    """Add ``n_trials`` trials (default ``tune.n_trials``) to the study in ``params.tune`` and summarise it.

    The pipeline (``pipelines/tune.py``) runs the same three steps as Prefect tasks; this is the library entry.
    """
    session = start_session(params, prepared_dir, track=track, pruner=pruner)
    trials_here = run_trials(session, n_trials or params.tune.n_trials, timeout=timeout, work_dir=work_dir, echo=echo)
    return finish_session(session, best_out, trials_here)


def check_prepared(prepared_dir: str | os.PathLike[str]) -> None:
    """Tuning scores on the validation split: fail early when the prepared data has none."""
    from nucleiseg.train import load_prepared

    data = load_prepared(prepared_dir)
    if not data.val_items:
        raise TuningError(
            f"{Path(prepared_dir) / 'images' / 'val'}: no validation images; tuning scores trials on the "
            "validation split (set split.val > 0 and run `nucleiseg prepare`)"
        )


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    *,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[int]:
    """Run ``n_trials`` trials of ``objective`` in this process; returns their numbers."""
    from optuna.trial import TrialState

    here: list[int] = []

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        here.append(trial.number)
        if echo is None:
            return
        if trial.state == TrialState.COMPLETE:
            echo(f"trial {trial.number} complete: {study.user_attrs.get('objective')} = {trial.value:.4f}")
        elif trial.state == TrialState.PRUNED:
            echo(f"trial {trial.number} pruned at epoch {trial.last_step}")
        else:
            echo(f"trial {trial.number} {trial.state.name.lower()}")

    with _quiet_optuna():
        # A trial that dies in training (out of memory, a diverging loss) is recorded as failed and the study
        # goes on; anything else (missing data, bad settings) stops the worker.
        study.optimize(
            objective, n_trials=n_trials, timeout=timeout, callbacks=[record], gc_after_trial=True,
            catch=(RuntimeError,),
        )  # fmt: skip
    return here


@contextlib.contextmanager
def _quiet_optuna() -> Any:
    """Optuna logs every trial at INFO; the callers report trials themselves."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
