"""Training: Adam on the weighted cross-entropy + perceptual loss, validated on whole images, resumable.

One call of :func:`train` is one training run. It reads the prepared dataset (the output of the
preprocessing flow: ``splits.json``, ``stats.json``, ``stain.json``, ``patches/train`` and
``images/val``), trains with the settings it is given, validates every ``val_every`` epochs with
full-image tiled inference and the object-level metrics, and keeps two checkpoints in ``out_dir``:

- ``last.pt``: written atomically after every epoch with the model, optimizer, epoch, best score and the
  RNG states, so ``resume=True`` continues a killed run to the same result as an uninterrupted one;
- ``best.pt``: the model with the best validation score so far.

Both load with ``torch.load(weights_only=True)`` and hold what :func:`nucleiseg.infer.load_predictor`
needs (model factory arguments, normalisation statistics, stain normaliser, inference settings).

Reproducibility: the order of patches in epoch ``e`` and the augmentation of each sample depend only
on ``(seed, e, index)``, never on how many epochs ran in this process, which is what makes resume exact.
Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data-parallel (NCCL on GPUs, gloo on CPUs); only
rank 0 validates, writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nucleiseg.data import class_weights, list_patches, target_frequencies
from nucleiseg.io import atomic_path, read_image, write_json_atomic
from nucleiseg.params import Params

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The prepared dataset


@dataclass
class PreparedData:
    """What training reads from the preprocessing flow's output folder."""

    root: Path
    train_items: list[tuple[Path, Path, Path | None]]  # patch, label, ignore map
    val_items: list[tuple[Path, Path, Path | None]]  # image, label, ignore map
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stain: dict[str, Any] | None


def load_prepared(root: str | os.PathLike[str]) -> PreparedData:
    """Read the preprocessing output; a missing piece is named in the error."""
    root = Path(root)
    stats_path = root / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path}: not found; run `nucleiseg prepare` first")
    stats = json.loads(stats_path.read_text())
    patch_dir = root / "patches" / "train"
    if not patch_dir.is_dir():
        raise FileNotFoundError(f"{patch_dir}: no training patches")
    train_items = list_patches(patch_dir)
    if not train_items:
        raise FileNotFoundError(f"{patch_dir}: no training patches")
    val_items = list(split_items(root, "val"))
    stain_path = root / "stain.json"
    stain = json.loads(stain_path.read_text()) if stain_path.is_file() else None
    return PreparedData(root, train_items, val_items, tuple(stats["mean"]), tuple(stats["std"]), stain)


def split_items(root: Path, split: str) -> list[tuple[Path, Path, Path | None]]:
    """(image, label, ignore map or None) for the whole, stain-normalised images of one split."""
    folder = root / "images" / split
    items = []
    for image in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if image.stem.endswith(("_label", "_other")):
            continue
        other = image.with_name(image.stem + "_other.png")
        items.append((image, image.with_name(image.stem + "_label.png"), other if other.is_file() else None))
    return items


# ----------------------------------------------------------------------------------------------------
# Devices, seeds, distribution


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code draws from the global RNG)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain containers, so checkpoints load with ``weights_only=True``."""
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, rest = state["python"][0], state["python"][1:]
    random.setstate((version, tuple(rest[0]), *rest[1:]))
    name, keys, *tail = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *tail))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


# ----------------------------------------------------------------------------------------------------
# Data


class SeededSamples(Dataset):
    """Each sample's augmentation seeded by ``(seed, epoch, index)``: the same in any process or worker."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2**31
        return self.dataset.sample(index, seed=sample_seed)


def epoch_loader(
    samples: SeededSamples, epoch: int, batch_size: int, num_workers: int, seed: int, dist_info: Distributed
) -> DataLoader:
    """A loader whose shuffle order depends only on (seed, epoch)."""
    samples.epoch = epoch
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    sampler = None
    if dist_info.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(samples, num_replicas=dist_info.world_size, rank=dist_info.rank, seed=seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        drop_last=len(samples) >= batch_size * dist_info.world_size,
        persistent_workers=False,
        pin_memory=False,
    )


# ----------------------------------------------------------------------------------------------------
# Optimisation


def epoch_steps(n_samples: int, global_batch: int, limit: int | None) -> int:
    """Optimizer steps in one epoch: full batches (a last partial batch is dropped when there is at least
    one full one, as :func:`epoch_loader` does), at most ``limit``."""
    steps = n_samples // global_batch if n_samples >= global_batch else 1
    return steps if limit is None else min(steps, limit)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule of ``train.schedule`` (None for a constant rate).

    - ``onecycle``: torch's OneCycleLR, cosine warm-up from ``lr/25`` to ``lr`` over ``warmup`` of the steps,
      then cosine annealing to ``lr/25e4``; Adam's first moment is left alone (``cycle_momentum=False``).
    - ``cosine``: linear warm-up from 0 over ``warmup`` of the steps, then cosine annealing to 0.
    """
    total_steps = max(int(total_steps), 1)
    if schedule == "constant":
        return None
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=max(warmup, 1e-6), cycle_momentum=False
        )
    if schedule == "cosine":
        warm = round(warmup * total_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(total_steps - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"train.schedule: unknown schedule {schedule!r} (constant, onecycle, cosine)")


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def model_spec(params: Params) -> dict[str, Any]:
    """Factory arguments that rebuild the architecture (weights come from the checkpoint)."""
    return {
        "name": params.model.name,
        "encoder": params.model.encoder,
        "num_classes": params.model.num_classes,
        "dropout": params.model.dropout,
    }


def predictor_extras(params: Params, data: PreparedData) -> dict[str, Any]:
    """What inference needs besides the weights (the contract of :func:`nucleiseg.infer.load_predictor`)."""
    return {
        "model_kwargs": model_spec(params),
        "norm_mean": list(data.mean),
        "norm_std": list(data.std),
        "stain": data.stain,
        "infer": params.infer.model_dump(mode="json", include={"tile", "overlap", "batch_size", "tta"}),
        "post": params.post.model_dump(mode="json"),
        "mpp": params.model.mpp,  # the training images' resolution: slides and tiles are resampled to it
    }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Validation


def validate(
    model: torch.nn.Module,
    items: list[tuple[Path, Path, Path | None]],
    data: PreparedData,
    params: Params,
    device: torch.device,
) -> dict[str, float]:
    """Full-image tiled inference + post-processing on the validation images; the summary figures."""
    from nucleiseg.infer import predict_probabilities
    from nucleiseg.labels import read_label
    from nucleiseg.metrics import evaluate_image, summarize
    from nucleiseg.postprocess import postprocess

    per_image = {}
    was_training = model.training
    model.eval()
    for image_path, label_path, other_path in items:
        image = read_image(image_path)
        probs = predict_probabilities(
            model,
            image,
            data.mean,
            data.std,
            tile=params.infer.tile,
            overlap=params.infer.overlap,
            batch_size=params.infer.batch_size,
            device=device,
        )
        pred = postprocess(probs, **params.post.model_dump())
        ignore = read_label(other_path) > 0 if other_path is not None else None
        per_image[image_path.stem] = evaluate_image(pred, read_label(label_path), ignore=ignore)
    model.train(was_training)
    summary = summarize(per_image)
    figures = {f"val_{k}": summary["all"][k] for k in ("f1", "dice", "hausdorff", "aji", "pq")}
    figures["val_accuracy"] = summary["classification"]["accuracy"]
    return {k: float("nan") if v is None else float(v) for k, v in figures.items()}


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    out_dir: Path
    best_score: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    model_uri: str | None = None
    encoder_pretrained: bool = False
    seconds: float = 0.0


def _log(callback: Callable[[str], None] | None, message: str) -> None:
    if callback is not None:
        callback(message)
    log.info(message)


def train(
    params: Params,
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    track: bool = True,
    progress: bool = True,
    max_epochs: int | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one model. ``max_epochs`` stops early (the schedule still counts ``train.epochs``).

    ``epoch_callback(epoch, metrics)`` is called on rank 0 after each validated epoch; it may raise to
    stop the run (Optuna's pruning does).
    """
    from nucleiseg.data import NucleiDataset, build_augmentation
    from nucleiseg.losses import SegmentationLoss
    from nucleiseg.models import create_model

    t_start = time.perf_counter()
    out = Path(out_dir or params.train.out_dir)
    tp = params.train
    device = select_device(tp.device)
    dist_info = init_distributed(device)
    if device.type == "cpu" and tp.threads:
        torch.set_num_threads(tp.threads)
    seed_everything(tp.seed + dist_info.rank, tp.deterministic)

    data = load_prepared(prepared_dir)
    aug = params.augmentation
    dataset = NucleiDataset(
        data.train_items,
        transform=build_augmentation(
            crop=aug.crop,
            scale=aug.scale,
            flip=aug.flip,
            rotate=aug.rotate,
            affine_shear=aug.affine_shear,
            elastic=aug.elastic,
            elastic_alpha=aug.elastic_alpha,
            elastic_sigma=aug.elastic_sigma,
            color_jitter=aug.color_jitter,
        ),
        mean=data.mean,
        std=data.std,
        w0=params.loss.w0,
        sigma=params.loss.sigma,
    )
    if params.loss.class_weights != "none":
        weights = (
            class_weights(target_frequencies([label for _, label, _ in data.train_items]))
            if params.loss.class_weights == "balanced"
            else np.asarray(params.loss.class_weights, dtype=np.float32)
        )
        dataset.class_weight = weights
        _log(echo, "class weights (background, tumor, lymphocyte, stroma, contour): " + _fmt_list(weights))
    samples = SeededSamples(dataset, tp.seed)

    model = create_model(
        params.model.name,
        encoder=params.model.encoder,
        encoder_weights=params.model.encoder_weights,
        num_classes=params.model.num_classes,
        dropout=params.model.dropout,
    )
    model_info = dict(model.info)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = SegmentationLoss(beta=tp.beta, vgg_weights=params.loss.vgg_weights).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tp.lr, betas=tuple(tp.betas), weight_decay=tp.weight_decay)
    steps_per_epoch = epoch_steps(len(samples), tp.batch_size * dist_info.world_size, tp.steps_per_epoch)
    total_steps = tp.epochs * steps_per_epoch
    scheduler = lr_scheduler(optimizer, tp.schedule, tp.lr, total_steps, tp.warmup)
    train_model: torch.nn.Module = model
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, best_score, best_epoch, history = 0, -math.inf, -1, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"{last_path}: no checkpoint to resume from")
        ckpt = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_score, best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["best_epoch"]
        history = list(ckpt["history"])
        set_rng_state(ckpt["rng"])
        _log(echo, f"resuming from {last_path} at epoch {start_epoch}")

    base = {"model_name": params.model.name, **predictor_extras(params, data), "params": params.model_dump(mode="json")}
    run = None
    if track and dist_info.is_main:
        run = _start_tracking(params, data, model_info, criterion, resume=resume, out=out)

    end_epoch = tp.epochs if max_epochs is None else min(tp.epochs, start_epoch + max_epochs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    try:
        for epoch in range(start_epoch, end_epoch):
            loader = epoch_loader(samples, epoch, tp.batch_size, tp.num_workers, tp.seed, dist_info)
            n_steps = len(loader) if tp.steps_per_epoch is None else min(len(loader), tp.steps_per_epoch)
            sums = {"loss": 0.0, "ce": 0.0, "perceptual": 0.0}
            t_epoch = time.perf_counter()
            train_model.train()
            bar = _progress(n_steps, f"epoch {epoch + 1}/{tp.epochs}", enabled=progress and dist_info.is_main)
            for step, (images, targets, weights) in enumerate(loader):
                if step >= n_steps:
                    break
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                targets, weights = targets.to(device), weights.to(device)
                with autocast:
                    logits = train_model(images)
                loss, parts = criterion(logits.float(), targets, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None and scheduler.last_epoch < total_steps:
                    scheduler.step()
                sums["loss"] += float(loss.detach())
                sums["ce"] += float(parts["ce"])
                sums["perceptual"] += float(parts["perceptual"])
                bar.update(
                    loss=sums["loss"] / (step + 1), per_s=(step + 1) * images.shape[0] / (time.perf_counter() - t_epoch)
                )
            bar.close()
            metrics = {f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()}
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            metrics["epoch_seconds"] = time.perf_counter() - t_epoch
            is_val_epoch = (epoch + 1) % tp.val_every == 0 or epoch + 1 == end_epoch
            if dist_info.is_main:
                if is_val_epoch and data.val_items:
                    metrics.update(validate(model, data.val_items, data, params, device))
                score = metrics.get(f"val_{tp.val_metric}", -metrics["train_loss"])
                score = -math.inf if score is None or math.isnan(score) else score
                if tp.val_metric == "hausdorff" and math.isfinite(score):
                    score = -score  # a distance: lower is better
                record = {"epoch": epoch + 1, **metrics}
                history.append(record)
                payload = {**base, "state_dict": model.state_dict()}
                keep = epoch + 1 == tp.epochs if tp.select == "last" else is_val_epoch and score > best_score
                if keep:
                    best_score, best_epoch = score, epoch + 1
                    save_checkpoint(best_path, {**payload, "epoch": epoch, "score": score})
                save_checkpoint(
                    last_path,
                    {
                        **payload,
                        "optimizer": optimizer.state_dict(),
                        **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
                        "epoch": epoch,
                        "best_score": best_score,
                        "best_epoch": best_epoch,
                        "history": history,
                        "rng": rng_state(),
                    },
                )
                if run is not None:
                    import mlflow

                    from nucleiseg.lineage import metric_name

                    # grouped by "/" in MLflow (train/loss, val/f1); history.json keeps the flat keys
                    mlflow.log_metrics(
                        {metric_name(k): v for k, v in metrics.items() if not math.isnan(v)}, step=epoch + 1
                    )
                _log(echo, f"epoch {epoch + 1}: " + _fmt(metrics))
                if epoch_callback is not None and is_val_epoch:
                    epoch_callback(epoch + 1, metrics)
            if dist_info.world_size > 1:
                torch.distributed.barrier()
    except BaseException:
        if run is not None:
            import mlflow

            mlflow.end_run(status="KILLED")
        raise

    result = TrainResult(
        out_dir=out,
        best_score=best_score,
        best_epoch=best_epoch,
        epochs_run=end_epoch - start_epoch,
        history=history,
        encoder_pretrained=bool(model_info.get("encoder_pretrained", False)),
        seconds=time.perf_counter() - t_start,
    )
    if dist_info.is_main:
        write_json_atomic(out / "history.json", history)
        write_json_atomic(
            out / "train_summary.json",
            {
                "best_score": best_score if math.isfinite(best_score) else None,
                "best_epoch": best_epoch,
                "epochs": len(history),
                "seconds": round(result.seconds, 1),
                "val_metric": tp.val_metric,
                "select": tp.select,
                "encoder_pretrained": result.encoder_pretrained,
            },
        )
    if run is not None:
        result.run_id, result.model_uri = _finish_tracking(model, data, params, out, history, device)
    if dist_info.world_size > 1:
        torch.distributed.destroy_process_group()
    return result


# ----------------------------------------------------------------------------------------------------
# Helpers


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fmt_list(values: Any) -> str:
    return ", ".join(f"{float(v):.3g}" for v in values)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class _progress:
    """A per-epoch progress bar with loss and speed (rich), silent when disabled."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[per_s]:.1f} samples/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, loss=float("nan"), per_s=0.0)

    def update(self, **fields: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _start_tracking(
    params: Params, data: PreparedData, model_info: dict[str, Any], criterion: Any, *, resume: bool, out: Path
) -> Any:
    import mlflow

    from nucleiseg import tracking

    tracking.configure(params.tracking.uri, params.tracking.experiment, params.tracking.artifacts)
    run_id_file = out / "mlflow_run_id"
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{params.model.name}-train")
    if run_id is None:
        out.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.info.run_id)
        tracking.log_params(params.flat())
        vgg_pretrained = getattr(criterion, "vgg_pretrained", None)
        mlflow.set_tags(
            {
                "git_commit": tracking.git_commit() or "unknown",
                "dataset_hash": _dataset_hash(params.data.dir, data.root),
                "params_hash": params.digest(),
                "encoder_pretrained": str(bool(model_info.get("encoder_pretrained", False))).lower(),
                "encoder_weights_source": str(model_info.get("encoder_weights_source", params.model.encoder_weights)),
                "vgg_pretrained": "n/a" if vgg_pretrained is None else str(bool(vgg_pretrained)).lower(),
            }
        )
        datasets = _split_datasets(params, data)
        if datasets:
            from nucleiseg.lineage import log_datasets

            log_datasets(run.info.run_id, datasets)
    return run


def _split_datasets(params: Params, data: PreparedData) -> dict[str, Any]:
    """The splits of ``splits.json`` as MLflow datasets (nucleiseg.lineage); empty without a split file."""
    from nucleiseg.lineage import split_datasets
    from nucleiseg.prepare import read_splits

    splits = data.root / "splits.json"
    if not splits.is_file():
        return {}
    folder = Path(params.data.dir)
    return split_datasets(folder if folder.is_dir() else data.root / "images", read_splits(splits))


def _dataset_hash(data_dir: str, prepared_root: Path) -> str:
    """The annotated dataset's content hash (as the registry records it); the prepared images' otherwise."""
    from nucleiseg import tracking

    folder = Path(data_dir)
    return tracking.dataset_hash(folder if folder.is_dir() else prepared_root / "images")


def _finish_tracking(
    model: torch.nn.Module, data: PreparedData, params: Params, out: Path, history: list[dict[str, float]], device: Any
) -> tuple[str, str]:
    import mlflow

    from nucleiseg import mlflow_model

    run_id = mlflow.active_run().info.run_id
    curves = out / "learning_curves.png"
    _plot_history(history, curves)
    mlflow.log_artifact(str(curves))
    mlflow.log_artifact(str(out / "history.json"))
    with tempfile.TemporaryDirectory() as tmp:
        overlay = _example_overlay(model, data, params, device, Path(tmp))
        if overlay is not None:
            mlflow.log_artifact(str(overlay), artifact_path="overlays")
    best = out / "best.pt"
    best_epoch = None
    if best.is_file():
        checkpoint = load_checkpoint(best, map_location=device)
        model.load_state_dict(checkpoint["state_dict"])
        best_epoch = int(checkpoint["epoch"]) + 1
    # The pyfunc model (nucleiseg.mlflow_model): safetensors weights and a JSON config, no pickle; its input
    # example is a small crop of a real image.
    example_image = read_image(data.val_items[0][0] if data.val_items else data.train_items[0][0])
    config = {"model_name": params.model.name, **predictor_extras(params, data)}
    info = mlflow_model.log_model(model.cpu(), config, mlflow_model.example_crop(example_image))
    _describe_logged_model(run_id, info.model_id, best, history, best_epoch, _split_datasets(params, data))
    mlflow.end_run()
    (out / "model_uri").write_text(info.model_uri)
    return run_id, info.model_uri


def _describe_logged_model(
    run_id: str,
    model_id: str | None,
    checkpoint: Path,
    history: list[dict[str, float]],
    epoch: int | None,
    datasets: dict[str, Any],
) -> None:
    """Tie the run to the checkpoint it logged (so ``nucleiseg score`` knows where that checkpoint's test figures
    belong) and give the logged model the validation figures of the epoch it was saved at, on the validation set."""
    import mlflow

    from nucleiseg import lineage

    if checkpoint.is_file():
        mlflow.set_tag(lineage.CHECKPOINT_TAG, lineage.checkpoint_digest(checkpoint))
    record = next((h for h in history if h["epoch"] == epoch), None)
    if record is not None and model_id is not None:
        figures = {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_")}
        # at the epoch's own step: the run's val/ curves get the same point again, not a new one
        lineage.log_figures(
            run_id, figures, prefix="val", step=int(epoch), model_id=model_id, dataset=datasets.get("val")
        )


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "train_ce", "train_perceptual"):
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training loss")
    axes[0].legend()
    for key in ("val_f1", "val_dice", "val_aji", "val_accuracy"):
        axes[1].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _example_overlay(model: torch.nn.Module, data: PreparedData, params: Params, device: Any, out: Path) -> Path | None:
    if not data.val_items:
        return None
    from nucleiseg.export import overlay
    from nucleiseg.infer import predict_probabilities
    from nucleiseg.io import write_image
    from nucleiseg.postprocess import postprocess

    image_path = data.val_items[0][0]
    image = read_image(image_path)
    model.eval()
    probs = predict_probabilities(
        model, image, data.mean, data.std, tile=params.infer.tile, overlap=params.infer.overlap, device=device
    )
    label = postprocess(probs, **params.post.model_dump())
    path = out / f"{image_path.stem}_overlay.png"
    write_image(path, overlay(image, label))
    return path
