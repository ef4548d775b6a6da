"""The paper's ablation as a Prefect flow: five rows trained and scored alike, then ``reports/ablation.md``.

``nucleiseg ablate`` runs this flow (definitions of the rows, the scores and the report:
:mod:`nucleiseg.ablation`)::

    for each row (fcn8s, unet, no_perceptual, no_pretrained, full), one after the other:
        train-<row>  (an MLflow run: training curves, checkpoints, the logged model)
        score-<row>  (the test split's original images; figures logged on the row's run, tags ablation, ablation.row)
    report       (reports/ablation.md + ablation.json, given to the ablation's parent run; Markdown artifact
                  ``ablation``)

Rows run sequentially: each one uses the whole machine. A row that fails is marked failed in the report
and the others still run; the flow then fails, naming the failed rows, after writing the report. No caching
(a row is a training run) and no retries (a failing configuration fails again).

Budget: ``nucleiseg ablate --epochs 50`` gives every row 50 epochs (default ``train.epochs``); steps per
epoch, batch size and crop come from params (``--set train.steps_per_epoch=...``).

The same five rows as queued DVC experiments
--------------------------------------------
Each DVC experiment runs the pipeline (``dvc.yaml``) up to the ``evaluate`` stage with one setting changed,
and ``dvc exp show`` puts their test metrics (``reports/metrics.json``) side by side. With params.yaml
holding the full method (``model.name: resunet34``, ``model.encoder_weights: imagenet``, ``train.beta: 0.1``)::

    dvc exp run evaluate --queue -n fcn8s -S model.name=fcn8s
    dvc exp run evaluate --queue -n unet -S model.name=unet
    dvc exp run evaluate --queue -n no-perceptual -S train.beta=0
    dvc exp run evaluate --queue -n no-pretrained -S model.encoder_weights=none
    dvc exp run evaluate --queue -n full
    dvc queue start            # one worker (the default -j 1): the rows share the machine
    dvc queue status           # or: dvc queue logs <name>
    dvc exp show --md --only-changed --keep 'model.name|train.beta|encoder_weights|all.f1|all.dice|accuracy'

Stopping at ``evaluate`` keeps the ablation out of the model registry. This flow is the one-command
equivalent that also writes the tables in the paper's layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from nucleiseg.ablation import (
    LABELS,
    ROW_KEYS,
    AblationError,
    finish,
    new_ablation_id,
    row_params,
    score_row,
    split_test_items,
    start_parent_run,
    tag_row_run,
    train_row,
)
from nucleiseg.params import Params

ARTIFACT_KEY = "ablation"


@task(name="train-row", task_run_name="train-{key}", cache_policy=NO_CACHE)
def train_row_task(params: Params, key: str, prepared_dir: str, out_dir: str, track: bool) -> dict[str, Any]:
    """Train one row of the ablation (its own MLflow run)."""
    logger = get_run_logger()
    return train_row(params, key, prepared_dir, Path(out_dir) / key, track=track, echo=logger.info)


@task(name="score-row", task_run_name="score-{key}", cache_policy=NO_CACHE)
def score_row_task(
    key: str, trained: dict[str, Any], items: list[Any], device: str, ablation_id: str, parent_run_id: str | None
) -> dict[str, Any]:
    """Score one trained row on the test split; tag its run and log the figures on it."""
    row = score_row(trained, items, device)
    if row.get("run_id"):
        tag_row_run(row, ablation_id, parent_run_id)
    return row


@flow(name="ablation")
def ablation(
    settings: dict[str, Any],
    prepared_dir: str,
    data_dir: str,
    out_dir: str,
    report_path: str,
    epochs: int | None = None,
    rows: list[str] | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Train and score the ablation's rows (default: all five) and write the report."""
    logger = get_run_logger()
    params = Params.model_validate(settings)
    keys = list(rows or ROW_KEYS)
    unknown = sorted(set(keys) - set(ROW_KEYS))
    if unknown:
        raise AblationError(f"unknown ablation row(s) {', '.join(unknown)}; choose from {', '.join(ROW_KEYS)}")
    items = split_test_items(params, prepared_dir, data_dir)
    ablation_id = new_ablation_id()
    parent = start_parent_run(params, ablation_id, keys) if track else None
    results: list[dict[str, Any]] = []
    for key in keys:
        row_settings = row_params(params, key, epochs)
        state = train_row_task(row_settings, key, prepared_dir, out_dir, track, return_state=True)
        if state.is_completed():
            state = score_row_task(
                key, state.result(), items, row_settings.train.device, ablation_id, parent, return_state=True
            )
        if state.is_completed():
            results.append(state.result())
        else:
            error = state.result(raise_on_failure=False)
            logger.error("row %s failed: %s", key, error)
            results.append(
                {"key": key, "label": LABELS[key], "error": f"{type(error).__name__}: {error}", "seconds": 0.0}
            )
    outcome = finish(params, prepared_dir, data_dir, report_path, results, items, ablation_id, parent, epochs)
    create_markdown_artifact(
        key=ARTIFACT_KEY, markdown=Path(outcome["report"]).read_text(), description="The paper's ablation tables"
    )
    failed = [row["key"] for row in results if row.get("error")]
    if failed:
        raise AblationError(f"row(s) {', '.join(failed)} failed; the others are in {outcome['report']}")
    return outcome


def ablation_from_params(
    params: Params,
    prepared_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "models/ablation",
    report_path: str | os.PathLike[str] = "reports/ablation.md",
    *,
    epochs: int | None = None,
    rows: Sequence[str] | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run :func:`ablation` with the settings (``data.prepared`` and ``data.dir`` by default)."""
    return ablation(
        settings=params.model_dump(mode="json"),
        prepared_dir=str(prepared_dir if prepared_dir is not None else params.data.prepared),
        data_dir=str(data_dir if data_dir is not None else params.data.dir),
        out_dir=str(out_dir),
        report_path=str(report_path),
        epochs=epochs,
        rows=list(rows) if rows else None,
        track=track,
    )
