"""Where the batch flow's tasks run: as Prefect task runs inside a flow run, or as plain calls without Prefect.

Prefect 3 (3.9 here) runs a flow only against an API. When none is configured it starts a temporary
("ephemeral") API server in a subprocess, on every call: 5.9 s of CPU and 12 s of wall time per batch of two
tiles on the loaded 2-core development machine (``benchmarks/bench_batch_overhead.py``, figures in
benchmarks/README.md). ``nucleiseg batch`` therefore never lets Prefect start one; it chooses between two ways
of running the same code (:func:`pipelines.batch_inference.run_batch`):

Definitions
-----------
Prefect API configured
    ``PREFECT_API_URL`` is set, in the environment or in the active Prefect profile (e.g. pointing at the server
    that ``make prefect-server`` starts once: ``http://127.0.0.1:4200/api``), or a test harness set it.
orchestrated (an API is configured)
    :func:`pipelines.batch_inference.batch_inference` runs as a Prefect flow run: each image, slide chunk and
    spatial report is a task run on a Prefect task runner (``ThreadPoolTaskRunner``, or ``prefect_dask``'s
    ``DaskTaskRunner``), logs go to the API, the summary is a Markdown artifact. A call costs what talking to a
    running server costs (a second or two), never a server start. :class:`PrefectMapper`.
unorchestrated (no API)
    The flow's body runs as plain Python: the same planning, the same task functions (each Prefect task's
    ``.fn``), the same outputs and ``batch_summary.json`` (``flow_run_id`` null, ``orchestrated`` false); the
    mapped calls go to a :class:`concurrent.futures.Executor` (threads, or a ``dask.distributed`` cluster's
    executor for ``runner="dask"``), logs to Python's ``logging`` (logger ``pipelines.batch``; warnings reach
    stderr), and no flow run, task run or artifact is recorded anywhere. :class:`LocalMapper`.

Both map a task over argument lists and return, in input order, each call's result or, for a call that raised,
its exception (returned, not raised: one bad image must not stop the others; the caller turns it into a failed
entry). Both can show a progress bar (rich, on stderr) per mapped step, with the count, the elapsed time and an
estimate of the time remaining (ETA: the mean time per finished item so far, times the items left).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

Runner = Literal["threads", "dask"]
RUNNERS = ("threads", "dask")
# Where a mapped step runs: on the chosen runner, or on threads of this process (steps that need no network).
Where = Literal["runner", "threads"]


class RunnerError(RuntimeError):
    """The chosen runner cannot be used (a missing package, a bad worker count); the message says what to do."""


def prefect_api_configured() -> bool:
    """Whether a Prefect API is configured (``PREFECT_API_URL`` from the environment, profile or a harness)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def check_prefect_api() -> None:
    """Raise :class:`RunnerError` when the configured Prefect API does not answer its health check (one line
    naming the URL and what to do), rather than let the flow fail with a connection traceback."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value()).rstrip("/")
    try:
        answered = httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        answered = False
    if not answered:
        raise RunnerError(
            f"the Prefect API at {url} (PREFECT_API_URL) does not answer: start it (make prefect-server) or unset "
            "PREFECT_API_URL to run without Prefect"
        )


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a flow or task run (its lines reach the API); ``pipelines.batch`` outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pipelines.batch")


def check_runner(runner: str, workers: int) -> None:
    """Raise :class:`RunnerError` for an unknown runner or a worker count below 1."""
    if workers < 1:
        raise RunnerError(f"workers must be >= 1, got {workers}")
    if runner not in RUNNERS:
        raise RunnerError(f"unknown runner {runner!r}; expected one of {', '.join(RUNNERS)}")


class ProgressBars:
    """One rich progress display on stderr, a bar per mapped step; does nothing when disabled.

    Enabled, it draws even when stderr is not a terminal (the caller decides: ``nucleiseg batch`` enables it on
    a terminal or with ``--progress``), so that it can be captured.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True, force_terminal=True),
            )

    def __enter__(self) -> ProgressBars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, label: str, total: int) -> int | None:
        """A new bar of ``total`` items; its id for :meth:`advance` (None when disabled)."""
        return None if self._progress is None else self._progress.add_task(label, total=total)

    def advance(self, bar: int | None) -> None:
        if self._progress is not None and bar is not None:
            self._progress.advance(bar)  # type: ignore[arg-type]


class Mapper:
    """Maps a Prefect task over argument lists on ``runner`` with ``workers``; use as a context manager.

    ``map(task, mapped, fixed, label)``: ``mapped`` holds one list per varying argument (all the same length),
    ``fixed`` the arguments every call shares; returns each call's result, or its exception, in input order.
    """

    orchestrated: bool = False

    def __init__(self, runner: str, workers: int, dask_address: str | None = None, progress: bool = False) -> None:
        check_runner(runner, workers)
        self.runner = runner
        self.workers = workers
        self.dask_address = dask_address
        self.progress = ProgressBars(progress)

    @property
    def shares_memory(self) -> bool:
        """Whether tasks run in this process (threads), so that they can share one loaded model."""
        return self.runner == "threads"

    def __enter__(self) -> Mapper:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def map(
        self,
        task: Any,
        mapped: Mapping[str, Sequence[Any]],
        fixed: Mapping[str, Any],
        label: str,
        where: Where = "runner",
    ) -> list[Any]:
        total = len(next(iter(mapped.values()))) if mapped else 0
        if total == 0:
            return []
        bar = self.progress.add(label, total)
        return self._map(task, mapped, fixed, where, lambda: self.progress.advance(bar))

    def _map(self, task: Any, mapped: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any], where: Where,
             done: Any) -> list[Any]:  # fmt: skip
        raise NotImplementedError


class PrefectMapper(Mapper):
    """Task runs on a fresh Prefect task runner per step (a runner is entered once), inside the current flow run."""

    orchestrated = True

    def __init__(self, runner: str, workers: int, dask_address: str | None = None, progress: bool = False) -> None:
        super().__init__(runner, workers, dask_address, progress)
        if runner == "dask":
            _task_runner(runner, workers, dask_address)  # fails now on a missing prefect-dask, before any work

    def _map(self, task: Any, mapped: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any], where: Where,
             done: Any) -> list[Any]:  # fmt: skip
        from prefect import unmapped
        from prefect.futures import as_completed
        from prefect.utilities.annotations import quote

        kind = self.runner if where == "runner" else "threads"
        runner = _task_runner(kind, self.workers, self.dask_address)
        # On threads, quote: Prefect must not walk into the shared arguments (a loaded model) looking for futures.
        # Not on Dask: there they travel pickled and small (ModelSource), and a quote would arrive as a tuple.
        fixed = {k: quote(v) for k, v in fixed.items()} if kind == "threads" else fixed
        arguments = {**mapped, **{k: unmapped(v) for k, v in fixed.items()}}
        with runner:
            futures = runner.map(task, arguments)
            for _ in as_completed(list(futures)):
                done()
            return [f.result() if f.state.is_completed() else f.result(raise_on_failure=False) for f in futures]


class LocalMapper(Mapper):
    """Plain calls of each task's function on a thread pool, or on a ``dask.distributed`` cluster's executor
    (a local cluster of ``workers`` processes started at the first Dask step, or the scheduler at
    ``dask_address``; closed on exit)."""

    def __init__(self, runner: str, workers: int, dask_address: str | None = None, progress: bool = False) -> None:
        super().__init__(runner, workers, dask_address, progress)
        self._client: Any = None
        if runner == "dask":
            try:
                import distributed  # noqa: F401
            except ImportError:
                raise RunnerError(
                    "runner 'dask' needs dask.distributed (pip install prefect-dask); use runner 'threads' on one "
                    "machine"
                ) from None

    def __exit__(self, *exc: object) -> None:
        try:
            if self._client is not None:
                cluster = self._client.cluster
                self._client.close()
                if cluster is not None and self.dask_address is None:
                    cluster.close()
                self._client = None
        finally:
            super().__exit__(*exc)

    def _executor(self, where: Where) -> concurrent.futures.Executor:
        if where == "threads" or self.runner == "threads":
            return concurrent.futures.ThreadPoolExecutor(max_workers=self.workers)
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.dask_address:
                self._client = Client(self.dask_address)
            else:
                cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, dashboard_address=None)
                self._client = Client(cluster)
        # pure=False: the same arguments twice are two calls (outputs are written), not one cached result.
        return self._client.get_executor(pure=False)

    def _map(self, task: Any, mapped: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any], where: Where,
             done: Any) -> list[Any]:  # fmt: skip
        function = getattr(task, "fn", task)  # the Prefect task's own function: no task run, no API
        executor = self._executor(where)
        total = len(next(iter(mapped.values())))
        # The arguments travel as one dict: Dask's submit() would take some names (key, pure, ...) as its own.
        futures = [
            executor.submit(_call, function, {**{k: v[i] for k, v in mapped.items()}, **fixed}) for i in range(total)
        ]  # fmt: skip
        try:
            for _ in concurrent.futures.as_completed(futures):
                done()
        finally:
            if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
                executor.shutdown(wait=True, cancel_futures=True)
        return [f.exception() if f.exception() is not None else f.result() for f in futures]


def _call(function: Any, arguments: dict[str, Any]) -> Any:
    return function(**arguments)


def _task_runner(runner: str, workers: int, dask_address: str | None) -> Any:
    """A fresh Prefect task runner: ``ThreadPoolTaskRunner`` or ``prefect_dask.DaskTaskRunner``."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RunnerError(
            "runner 'dask' needs the prefect-dask package (pip install prefect-dask); use runner 'threads' on one "
            "machine"
        ) from None
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})


__all__ = [
    "RUNNERS",
    "LocalMapper",
    "Mapper",
    "PrefectMapper",
    "ProgressBars",
    "Runner",
    "RunnerError",
    "check_prefect_api",
    "check_runner",
    "prefect_api_configured",
    "run_logger",
]
