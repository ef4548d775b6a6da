"""The paper's ablation (Qu et al., ISBI 2019, Tables 1 and 2): five configurations, one budget, one report.

Definitions
-----------
rows
    ``fcn8s`` FCN-8s; ``unet`` U-Net; ``no_perceptual`` the ResNet34 U-Net without the perceptual loss
    (``train.beta = 0``); ``no_pretrained`` the ResNet34 U-Net without a pretrained encoder
    (``model.encoder_weights = none``); ``full`` the full method (ResNet34 U-Net, ImageNet encoder,
    weighted cross-entropy plus the perceptual loss). The full method's settings come from params, except that
    it always has a perceptual term (``beta`` from params when positive, else the paper's 0.1) and always asks
    for a pretrained encoder (``encoder_weights`` from params unless ``none``, else ``imagenet``). Every other
    row changes exactly one thing from it: the two baselines their architecture (same loss, weight map,
    perceptual term, augmentation), the two ablations their one factor.
same data, seed and budget
    Every row trains on the same prepared dataset with the same ``train.seed``, epochs, steps per epoch,
    batch size and crop, and is scored on the same test split.
scores
    Each row's model (its best validation checkpoint, else its last) predicts the test split's *original*
    images and is scored by :func:`nucleiseg.evaluation.evaluate_model`: detection F1, object Dice and
    Hausdorff distance (pixels) for all nuclei and per class (Table 1), and the classification accuracy of
    the detected nuclei, overall and per true class (Table 2), averaged as :func:`nucleiseg.metrics.summarize`.
paper figures
    Only published figures that can be cited are shown beside ours (:data:`PAPER`); the others are marked as
    not available, never estimated.

Tracking: each row is the MLflow run of its training (:func:`nucleiseg.train.train`), tagged ``ablation``
(the ablation's id) and ``ablation.row``, nested under one parent run that holds the report; the test
figures are logged on it as ``test/<group>/<figure>`` and ``test/classification/accuracy[_<class>]``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nucleiseg.io import write_json_atomic, write_text_atomic
from nucleiseg.params import Params


class AblationError(RuntimeError):
    """The ablation cannot run as asked (no test images, unknown row); says what to fix."""


@dataclass(frozen=True)
class Row:
    key: str
    label: str  # as the paper's tables name it


ROWS: tuple[Row, ...] = (
    Row("fcn8s", "FCN-8s"),
    Row("unet", "U-Net"),
    Row("no_perceptual", "ResUNet34 w/o perceptual loss"),
    Row("no_pretrained", "ResUNet34 w/o pretrained encoder"),
    Row("full", "Full method (ResUNet34)"),
)
ROW_KEYS: tuple[str, ...] = tuple(row.key for row in ROWS)
LABELS: dict[str, str] = {row.key: row.label for row in ROWS}
PAPER_BETA = 0.1
CLASSES = ("tumor", "lymphocyte", "stroma")
GROUPS = ("all", *CLASSES)

PAPER_SOURCE = (
    "Qu et al., Joint Segmentation and Fine-Grained Classification of Nuclei in Histopathology Images, "
    "ISBI 2019; full method, all nuclei, as quoted in the nucleiseg developers' guide"
)
PAPER: dict[str, dict[str, float]] = {
    "full": {"all.f1": 0.886, "all.dice": 0.876, "all.hausdorff": 4.14, "accuracy": 0.8475},
}
"""Published figures that can be cited, by row, as ``group.figure`` and ``accuracy[_class]`` (fractions)."""


# ----------------------------------------------------------------------------------------------------
# Configurations


def row_overrides(base: Params, key: str) -> dict[str, Any]:
    """The settings of row ``key`` that differ from (or are pinned on) ``base`` (module docstring)."""
    if key not in LABELS:
        raise AblationError(f"unknown ablation row {key!r}; choose from {', '.join(ROW_KEYS)}")
    full = {
        "model.name": "resunet34",
        "train.beta": base.train.beta if base.train.beta > 0 else PAPER_BETA,
        "model.encoder_weights": base.model.encoder_weights if base.model.encoder_weights != "none" else "imagenet",
    }
    change = {
        "fcn8s": {"model.name": "fcn8s"},
        "unet": {"model.name": "unet"},
        "no_perceptual": {"train.beta": 0.0},
        "no_pretrained": {"model.encoder_weights": "none"},
        "full": {},
    }[key]
    return {**full, **change}


def row_params(base: Params, key: str, epochs: int | None = None) -> Params:
    """The settings row ``key`` trains with (``epochs`` replaces ``train.epochs`` when given)."""
    from nucleiseg.tuning import apply_overrides

    values = row_overrides(base, key)
    if epochs is not None:
        values["train.epochs"] = epochs
    return apply_overrides(base, values)


# ----------------------------------------------------------------------------------------------------
# One row: train, then score on the test split


def train_row(
    params: Params,
    key: str,
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    track: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train row ``key`` with its ``params`` (:func:`row_params`) into ``out_dir``; what it produced."""
    from nucleiseg.train import train

    result = train(params, prepared_dir, out_dir, track=track, progress=False, echo=echo)
    best, last = Path(out_dir) / "best.pt", Path(out_dir) / "last.pt"
    return {
        "key": key,
        "label": LABELS[key],
        "model": params.model.name,
        "encoder_weights": params.model.encoder_weights,
        "encoder_pretrained": result.encoder_pretrained,
        "beta": params.train.beta,
        "vgg_weights": params.loss.vgg_weights,
        "params_hash": params.digest(),
        "checkpoint": str(best if best.is_file() else last),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_metric": params.train.val_metric,
        "best_val_score": result.best_score if math.isfinite(result.best_score) else None,
        "run_id": result.run_id,
        "train_seconds": round(result.seconds, 1),
    }


def score_row(trained: Mapping[str, Any], items: Sequence[Any], device: str = "auto") -> dict[str, Any]:
    """Score a trained row's checkpoint on the test items (:func:`nucleiseg.evaluation.split_items`)."""
    from nucleiseg.evaluation import evaluate_model
    from nucleiseg.infer import load_predictor

    start = time.perf_counter()
    report = evaluate_model(load_predictor(trained["checkpoint"], device=device), list(items))
    seconds = time.perf_counter() - start
    return {
        **trained,
        "test": json_ready(report["summary"]),
        "test_images": sorted(report["images"]),
        "eval_seconds": round(seconds, 1),
        "seconds": round(trained["train_seconds"] + seconds, 1),
    }


def row_test_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Table 1 and 2 figures of a test summary as MLflow metrics (undefined ones left out), named as ``nucleiseg
    score`` names a training run's test figures (nucleiseg.lineage): ``test/all/f1``,
    ``test/classification/accuracy``."""
    out: dict[str, float] = {}
    for group in GROUPS:
        for figure in ("f1", "dice", "hausdorff", "aji", "pq"):
            out[f"test/{group}/{figure}"] = summary[group][figure]
    cls = summary["classification"]
    out["test/classification/accuracy"] = cls["accuracy"]
    for name in CLASSES:
        out[f"test/classification/accuracy_{name}"] = cls[f"accuracy_{name}"]
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(float(v))}


def tag_row_run(row: Mapping[str, Any], ablation_id: str, parent_run_id: str | None) -> None:
    """Tag the row's training run (``ablation``, ``ablation.row``, parent) and log its test figures."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient()
    tags = {"ablation": ablation_id, "ablation.row": row["key"], "ablation.label": row["label"]}
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id  # what a nested start_run records; train() starts its own
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in row_test_metrics(row["test"]).items()] if "test" in row else []
    client.log_batch(row["run_id"], metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])


def start_parent_run(params: Params, ablation_id: str, rows: Sequence[str]) -> str:
    """The ablation's parent run (holds the report); the rows are nested under it."""
    import mlflow

    from nucleiseg import tracking
    from nucleiseg.tuning import configure_tracking

    experiment_id = configure_tracking(params)
    run = mlflow.MlflowClient().create_run(
        experiment_id,
        run_name=ablation_id,
        tags={
            "ablation.study": ablation_id,
            "ablation.rows": ",".join(rows),
            "git_commit": tracking.git_commit() or "unknown",
            "params_hash": params.digest(),
        },
    )
    return run.info.run_id


def finish_parent_run(run_id: str, report_path: str | os.PathLike[str], failed: bool) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    report_path = Path(report_path)
    for path in (report_path, report_path.with_suffix(".json")):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def new_ablation_id() -> str:
    return "ablation-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# ----------------------------------------------------------------------------------------------------
# Budget and machine


def budget(params: Params, prepared_dir: str | os.PathLike[str], n_test: int) -> dict[str, Any]:
    """What every row was given: epochs, optimizer steps, samples, images (the same for all rows)."""
    from nucleiseg.train import load_prepared

    data = load_prepared(prepared_dir)
    tp = params.train
    n_patches = len(data.train_items)
    batches = n_patches // tp.batch_size if n_patches >= tp.batch_size else 1  # drop_last, as training does
    steps = batches if tp.steps_per_epoch is None else min(batches, tp.steps_per_epoch)
    splits_path = Path(prepared_dir) / "splits.json"
    n_train = None
    if splits_path.is_file():
        import json

        n_train = len(json.loads(splits_path.read_text()).get("train", []))
    return {
        "epochs": tp.epochs,
        "steps_per_epoch": steps,
        "batch_size": tp.batch_size,
        "crop": params.augmentation.crop,
        "optimizer_steps": tp.epochs * steps,
        "samples_seen": tp.epochs * steps * tp.batch_size,
        "train_images": n_train,
        "train_patches": n_patches,
        "val_images": len(data.val_items),
        "test_images": n_test,
        "seed": tp.seed,
        "lr": tp.lr,
    }


def machine() -> dict[str, Any]:
    """The machine the rows ran on, in words."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(terse=True),
        "cpu": cpu or "unknown",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


# ----------------------------------------------------------------------------------------------------
# The report


def _value(row: Mapping[str, Any] | None, name: str) -> float | None:
    """``group.figure`` or ``accuracy[_class]`` from a row's test summary."""
    if row is None or "test" not in row:
        return None
    test = row["test"]
    if name.startswith("accuracy"):
        return test["classification"].get(name)
    group, figure = name.split(".")
    return test[group][figure]


def _fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "percent":
        return f"{100 * value:.2f}%"
    if kind == "pixels":
        return f"{value:.2f}"
    return f"{value:.3f}"


TABLE1_COLUMNS = [(f"{g}.{f}", f) for g in GROUPS for f in ("f1", "dice", "hausdorff")]
TABLE2_COLUMNS = ["accuracy", *(f"accuracy_{c}" for c in CLASSES)]
_KIND = {"f1": "fraction", "dice": "fraction", "hausdorff": "pixels"}


def _paper_cells(key: str, names: Sequence[str], kinds: Sequence[str]) -> list[str]:
    published = PAPER.get(key, {})
    return [_fmt(published[n], k) if n in published else "—" for n, k in zip(names, kinds, strict=True)]


def table1(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 1 in the paper's layout: F1, Dice, Hausdorff for all nuclei and per class; ours and the paper's."""
    groups = " | ".join(f"{g.capitalize() if g != 'all' else 'All nuclei'} F1 | Dice | Haus." for g in GROUPS)
    lines = [f"| Method | Figures | {groups} |", "|---|---|" + "---:|" * len(TABLE1_COLUMNS)]
    names = [n for n, _ in TABLE1_COLUMNS]
    kinds = [_KIND[f] for _, f in TABLE1_COLUMNS]
    for row in rows:
        if row.get("error"):
            cells = ["failed"] * len(names)
        else:
            cells = [_fmt(_value(row, n), k) for n, k in zip(names, kinds, strict=True)]
        lines.append(f"| {row['label']} | this run | " + " | ".join(cells) + " |")
        lines.append("|  | paper | " + " | ".join(_paper_cells(row["key"], names, kinds)) + " |")
    return "\n".join(lines)


def table2(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table 2 in the paper's layout: classification accuracy overall and per class; ours and the paper's."""
    header = "| Method | Figures | Overall | Tumor | Lymphocyte | Stroma |"
    lines = [header, "|---|---|---:|---:|---:|---:|"]
    kinds = ["percent"] * len(TABLE2_COLUMNS)
    for row in rows:
        if row.get("error"):
            cells = ["failed"] * len(TABLE2_COLUMNS)
        else:
            cells = [_fmt(_value(row, n), "percent") for n in TABLE2_COLUMNS]
        lines.append(f"| {row['label']} | this run | " + " | ".join(cells) + " |")
        lines.append("|  | paper | " + " | ".join(_paper_cells(row["key"], TABLE2_COLUMNS, kinds)) + " |")
    return "\n".join(lines)


def configurations_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| Row | Model | Encoder weights: asked → got | Perceptual β | Best val (epoch) | Train + test time "
        "| MLflow run |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| `{row['key']}` | failed: {row['error']} | | | | | |")
            continue
        if row["model"] == "unet":
            weights = "none (U-Net is always trained from scratch)"
        else:
            weights = f"{row['encoder_weights']} → {'pretrained' if row['encoder_pretrained'] else 'random init'}"
        score = row["best_val_score"]
        best = f"{row['val_metric']} {score:.3f} ({row['best_epoch']})" if score is not None else "n/a"
        lines.append(
            f"| `{row['key']}` | {row['model']} | {weights} | {row['beta']:g} | {best} | "
            f"{row['train_seconds']:.0f} + {row['eval_seconds']:.0f} s | {row.get('run_id') or '-'} |"
        )
    return "\n".join(lines)


def notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a reader must know to read the tables (computed from the rows)."""
    out = [
        "Published figures: only the full method's overall F1, Dice, Hausdorff and accuracy could be cited "
        f"({PAPER_SOURCE}). The other published cells (the baselines, the ablations and the per-class "
        "columns) were not available to this build and are shown as —, not estimated: see Tables 1 and 2 of "
        "the paper.",
        "The paper trained 300 epochs on 40 annotated lung-cancer tiles (about 24 000 nuclei); figures on "
        "another dataset or with a smaller budget measure this pipeline, not the method: compare the rows with "
        "each other, not with the paper, unless the budget and data match.",
        "Hausdorff distances are in pixels (lower is better). Accuracy is the share of detected nuclei "
        "(true positives of the detection) given their true class. `n/a`: undefined on this test split "
        "(e.g. no nucleus of that class, or none detected).",
    ]
    by_key = {row["key"]: row for row in rows if not row.get("error")}
    full, scratch = by_key.get("full"), by_key.get("no_pretrained")
    if full is not None and not full["encoder_pretrained"]:
        line = (
            f"The full method asked for `{full['encoder_weights']}` encoder weights but could not load them "
            "(no network access to the weights and none in the local caches), so its encoder started from "
            "random weights"
        )
        if scratch is not None:
            line += (
                ": in this run the rows *without pretrained encoder* and *full method* coincide in practice, "
                "and the table cannot show the effect of pretraining. Put the weights in the Hugging Face or "
                "torch hub cache (or give a checkpoint path as `model.encoder_weights`) and run again"
            )
        out.append(line + ".")
    vgg = {row["vgg_weights"] for row in by_key.values() if row["beta"] > 0}
    if vgg and vgg != {"imagenet"}:
        out.append(f"The perceptual loss ran with VGG16 weights `{', '.join(sorted(vgg))}`, not ImageNet.")
    return out


def render_report(
    rows: Sequence[Mapping[str, Any]],
    budget_info: Mapping[str, Any],
    machine_info: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> str:
    """``ablation.md``: Tables 1 and 2 beside the paper's figures, the configurations, the budget, notes."""
    b, m = budget_info, machine_info
    total = sum(row.get("seconds", 0.0) for row in rows)
    device = m["gpu"] or f"CPU ({m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines = [
        "# The paper's ablation: Tables 1 and 2",
        "",
        f"Ablation `{meta['ablation_id']}`: {len(rows)} rows trained on `{meta['prepared_dir']}` and scored on "
        f"the test split of `{meta['data_dir']}` ({b['test_images']} image(s): {', '.join(meta['test_names'])}).",
        "Every row has the same data, seed and budget (below) and differs from the full method in one factor.",
        "",
        "## Table 1: segmentation (test split)",
        "",
        table1(rows),
        "",
        "## Table 2: classification accuracy of the detected nuclei (test split)",
        "",
        table2(rows),
        "",
        "## Configurations",
        "",
        configurations_table(rows),
        "",
        "## Budget",
        "",
        f"- Per row: {b['epochs']} epoch(s) x {b['steps_per_epoch']} step(s) of batch {b['batch_size']} "
        f"({b['crop']}x{b['crop']} crops) = {b['optimizer_steps']} optimizer steps, {b['samples_seen']} samples; "
        f"Adam lr {b['lr']:g}, seed {b['seed']}.",
        f"- Data: {b['train_patches']} training patches from {b['train_images'] or '?'} training image(s); "
        f"{b['val_images']} validation image(s) (best checkpoint); {b['test_images']} test image(s).",
        f"- Machine: {device}; {m['platform']}; torch {m['torch']}.",
        f"- Time: {total:.0f} s in all (per row in the table above); finished {meta['finished']}.",
        "",
        "## Notes",
        "",
        *(f"- {line}" for line in notes(rows)),
        "",
    ]
    return "\n".join(lines)


def write_report(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    budget_info: Mapping[str, Any],
    machine_info: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``path`` (Markdown) and the same figures as JSON beside it (``.json``), atomically."""
    path = Path(path)
    write_text_atomic(path, render_report(rows, budget_info, machine_info, meta))
    write_json_atomic(
        path.with_suffix(".json"),
        json_ready({**meta, "budget": budget_info, "machine": machine_info, "paper": PAPER, "rows": list(rows)}),
    )
    return path


def json_ready(obj: Any) -> Any:
    """NaN becomes None (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------
# The whole ablation in one call


def split_test_items(
    params: Params, prepared_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]
) -> list[Any]:
    """The test split's original images; an empty test split is an error."""
    from nucleiseg.evaluation import split_items

    items = split_items(data_dir, Path(prepared_dir) / "splits.json", "test", params.eval.ignore_suffix)
    if not items:
        raise AblationError(f"{Path(prepared_dir) / 'splits.json'}: the test split is empty (set split.test > 0)")
    return items


def run_ablation(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    report_path: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    rows: Sequence[str] | None = None,
    track: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train and score the rows one after the other and write the report; a failing row is recorded, and the
    others still run. The pipeline (``pipelines/ablation.py``) runs the same steps as Prefect tasks."""
    keys = list(rows or ROW_KEYS)
    items = split_test_items(params, prepared_dir, data_dir)
    ablation_id = new_ablation_id()
    parent = start_parent_run(params, ablation_id, keys) if track else None
    results = []
    for key in keys:
        try:
            p = row_params(params, key, epochs)
            trained = train_row(p, key, prepared_dir, Path(out_dir) / key, track=track, echo=echo)
            row = score_row(trained, items, p.train.device)
            if track and row["run_id"]:
                tag_row_run(row, ablation_id, parent)
        except Exception as exc:  # one failing configuration must not lose the others
            row = {"key": key, "label": LABELS[key], "error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
        results.append(row)
    return finish(params, prepared_dir, data_dir, report_path, results, items, ablation_id, parent, epochs)


def finish(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    report_path: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    items: Sequence[Any],
    ablation_id: str,
    parent_run_id: str | None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Write the report (and give it to the parent run); the ablation's outcome as a dict."""
    effective = row_params(params, "full", epochs)
    meta = {
        "ablation_id": ablation_id,
        "prepared_dir": str(prepared_dir),
        "data_dir": str(data_dir),
        "test_names": [item.name for item in items],
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "parent_run_id": parent_run_id,
    }
    path = write_report(report_path, results, budget(effective, prepared_dir, len(items)), machine(), meta)
    if parent_run_id is not None:
        finish_parent_run(parent_run_id, path, failed=any(row.get("error") for row in results))
    return {**meta, "report": str(path), "rows": json_ready(list(results))}
