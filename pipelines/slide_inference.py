"""Whole slides in the batch-inference flow: the chunks of every slide as mapped Prefect tasks (threads or Dask).

``batch_inference`` (and its run without Prefect, :mod:`pipelines.execution`) hands its slides
(:func:`nucleiseg.wsi.is_slide`: slide formats, tiled TIFFs) to :func:`run_slides`::

    per slide, in the flow: plan (resolution, tissue, chunks, the slide's stain; nucleiseg.streaming.plan_slide)
      -> up to date? (its summary has this run's fingerprint and every output exists): skipped
      -> the plan saved in the slide's work folder; chunks already committed there are kept (resume)
    predict-chunk tasks for the remaining chunks of all slides at once (mapped; threads, or Dask workers)
    per slide, once all its chunks are committed: the outputs (nucleiseg.streaming.finish_slide)

A chunk task receives only the slide's work folder and the chunk's key: it reads the plan from the folder and
its region from the slide itself, so nothing large travels to a Dask worker (workers on other machines need the
slides and the output folder on a shared filesystem, as they need the model's location). With ``runner="dask"``
each worker process loads the pinned model once (:func:`pipelines.batch_inference.worker_predictor`).

Failures: an unreadable slide, an unknown resolution (no mpp in the metadata and none given) or a bad mask
fails that slide alone, at planning; a chunk that cannot be read (a truncated file) fails its slide with the
error naming the file and the region, and the chunks committed so far stay for the next run. Each slide gets one
entry in ``batch_summary.json``, with ``kind: "slide"``, its counts and outputs, or its error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from nucleiseg.infer import FileResult, InferSettings, PostSettings, Predictor
from nucleiseg.streaming import (
    ChunkStore,
    SlidePlan,
    SlideSettings,
    finish_slide,
    plan_slide,
    previous_summary,
    segment_chunk,
    slide_name,
    work_dir,
)
from nucleiseg.wsi import SlideError
from pipelines.batch_inference import ModelSource, worker_predictor
from pipelines.execution import Mapper, run_logger

_plans: dict[tuple[str, str], SlidePlan] = {}
_plans_lock = threading.Lock()


def split_slides(
    files: list[Path], problems: list[FileResult], folder: Path
) -> tuple[list[Path], list[Path], list[FileResult]]:
    """Separate the slides of an input folder from its tiles: ``(tiles, slides, problems)``. A folder holding
    only slides is not a folder "without images" (that problem is dropped)."""
    from nucleiseg.wsi import list_slides

    slides = list_slides(folder)
    slide_set = {p.resolve() for p in slides}
    tiles = [p for p in files if p.resolve() not in slide_set]
    if slides:
        problems = [p for p in problems if not (Path(p.input) == folder and p.status == "failed")]
    return tiles, slides, problems


def _plan_of(work: str, fingerprint: str) -> SlidePlan:
    """The saved plan of a slide run, read once per process."""
    with _plans_lock:
        plan = _plans.get((work, fingerprint))
        if plan is None:
            plan = _plans[(work, fingerprint)] = ChunkStore(work, fingerprint).load_plan()
        return plan


def predict_chunk(work: str, fingerprint: str, name: str, key: str, model: Predictor | ModelSource) -> dict[str, Any]:
    """Segment one chunk and commit its nuclei; an unreadable region gives ``{"error": ...}`` naming the file."""
    plan = _plan_of(work, fingerprint)
    predictor = model if isinstance(model, Predictor) else worker_predictor(model)
    try:
        result = segment_chunk(plan, plan.chunk(key), predictor)
    except (SlideError, ValueError, OSError) as exc:
        message = str(exc) if plan.path in str(exc) else f"{plan.path}: {exc}"
        run_logger().warning(f"failed: {type(exc).__name__}: {message}")
        return {"key": key, "error": f"{type(exc).__name__}: {message}"}
    ChunkStore(work, fingerprint).commit(result)
    return result.stats


# A module-level function under its own name, so that Dask workers unpickle it by reference.
predict_chunk_task = task(
    predict_chunk, name="predict-chunk", task_run_name="chunk-{name}-{key}", cache_policy=NO_CACHE, persist_result=False
)


def _entry(path: Path, status: str, reason: str, **fields: Any) -> dict[str, Any]:
    return {"input": str(path), "name": slide_name(path), "kind": "slide", "status": status, "reason": reason, **fields}


def _done_entry(path: Path, summary: Mapping[str, Any], status: str, reason: str, seconds: float) -> dict[str, Any]:
    per_class = summary["per_class"]
    return _entry(
        path, status, reason,
        nuclei=summary["nuclei"], tumor=per_class["tumor"], lymphocyte=per_class["lymphocyte"],
        stroma=per_class["stroma"], width=summary["level0_size"][0], height=summary["level0_size"][1],
        seconds=round(seconds, 3), outputs=summary["outputs"], chunks=summary["chunks"], clipped=summary["clipped"],
    )  # fmt: skip


def run_slides(
    mapper: Mapper,
    slides: list[Path],
    out: Path,
    model: Predictor | ModelSource,
    predictor: Predictor,
    model_info: Mapping[str, Any],
    infer: InferSettings,
    post: PostSettings,
    settings: SlideSettings,
    mpp: float | None = None,
    record: Callable[[list[Path]], None] | None = None,
    spatial: Any = None,
) -> list[dict[str, Any]]:
    """Segment ``slides`` into ``out``, the chunks of all of them mapped by ``mapper`` (in a Prefect flow run or
    without Prefect, on threads or Dask: :mod:`pipelines.execution`; a progress bar over chunks); returns one
    summary entry per slide (module docstring). ``model``: what the tasks use (the shared predictor, or a
    :class:`ModelSource` for Dask workers); ``predictor``: the flow's own, for planning. ``record`` is called
    with the paths written for each finished slide (output ownership). ``spatial``: the spatial report's
    :class:`nucleiseg.spatial.SpatialSettings` (None: its defaults)."""
    logger = run_logger()
    entries: dict[Path, dict[str, Any]] = {}
    active: list[tuple[Path, SlidePlan, Any, ChunkStore, list[str], float]] = []
    identity = str(model_info.get("identity", ""))
    for path in slides:
        started = time.perf_counter()
        try:
            plan, thumbnail = plan_slide(
                path, model_mpp=predictor.mpp, infer=infer, post=post, settings=settings, mpp=mpp,
                stain=predictor.stain, model_identity=identity,
            )  # fmt: skip
        except (SlideError, ValueError, OSError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            logger.warning(f"failed: {message}")
            entries[path] = _entry(path, "failed", "cannot plan", error=f"{type(exc).__name__}: {message}")
            continue
        previous = previous_summary(out, plan.name, plan.fingerprint)
        if previous is not None:
            entries[path] = _done_entry(path, previous, "skipped", "up to date: same slide, model and settings", 0.0)
            continue
        store = ChunkStore(work_dir(out, plan.name), plan.fingerprint).open()
        store.save_plan(plan)
        todo = [c.key for c in plan.chunks if not store.done(c.key)]
        active.append((path, plan, thumbnail, store, todo, started))
        logger.info(f"{path.name}: {len(plan.chunks)} chunks on tissue, {len(plan.chunks) - len(todo)} already done")

    failures: dict[Path, str] = {}
    jobs = [(path, plan, store, key) for path, plan, _, store, todo, _ in active for key in todo]
    outcomes = mapper.map(
        predict_chunk_task,
        {
            "work": [str(store.folder) for _, _, store, _ in jobs],
            "fingerprint": [plan.fingerprint for _, plan, _, _ in jobs],
            "name": [plan.name for _, plan, _, _ in jobs],
            "key": [key for _, _, _, key in jobs],
        },
        {"model": model},
        label="slide chunks",
    )
    for (path, plan, _, key), outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, dict):
            error = outcome.get("error")
        else:  # a bug: the task's exception, returned rather than raised
            error = f"{type(outcome).__name__}: {plan.path}: chunk {key}: {outcome}"
        if error and path not in failures:
            failures[path] = error
    for path, plan, thumbnail, store, todo, started in active:
        if path in failures:
            entries[path] = _entry(
                path, "failed", "a chunk failed (the committed chunks are kept)", error=failures[path]
            )
            continue
        summary = finish_slide(plan, store, out, thumbnail, model=model_info, reused=len(plan.chunks) - len(todo),
                               timings={"total": time.perf_counter() - started}, spatial=spatial)  # fmt: skip
        if record is not None:
            record([Path(p) for p in summary["outputs"].values()])
        entries[path] = _done_entry(path, summary, "ok", "computed", time.perf_counter() - started)
    return [entries[p] for p in slides]


__all__ = ["predict_chunk", "predict_chunk_task", "run_slides", "split_slides"]
