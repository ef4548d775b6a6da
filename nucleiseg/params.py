"""The settings schema: ``params.yaml`` is the single source of settings, validated once at start.

:func:`load_params` reads the YAML file, applies ``--set section.key=value`` overrides, and validates
the result with pydantic; an unknown key or a bad value is reported with its dotted name, before any
work starts. Library functions take plain arguments; only the CLI and the pipelines read params.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """Invalid settings; the message names the offending key."""


class _Section(BaseModel):
    # allow_inf_nan=False: an infinite or NaN setting (`--set loss.w0=.inf`) is an error, never a value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SynthParams(_Section):
    n_images: int = Field(12, ge=1)
    size: int = Field(512, ge=64)
    seed: int = 0


class DataParams(_Section):
    dir: str = "synthetic"  # the annotated dataset the pipeline trains on
    prepared: str = "prepared"  # output of the preprocessing flow
    ignore_suffix: str = "_other"
    # Where corrected annotations land (images with QuPath GeoJSON, or label PNGs), relative to the project;
    # the retraining flow imports, validates and merges them into `dir` (pipelines/retrain.py).
    inbox: str = Field("inbox", min_length=1)
    synth: SynthParams = SynthParams()


class StainParams(_Section):
    method: Literal["none", "reinhard", "macenko"] = "none"
    reference: str | None = None  # image name in the dataset; None: the first training image


class SplitParams(_Section):
    seed: int = 0
    train: float = Field(0.7, gt=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    stratify: bool = True
    explicit: dict[Literal["train", "val", "test"], list[str]] | None = None

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        if self.explicit is None and abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("train + val + test must sum to 1")
        return self


class PatchParams(_Section):
    size: int = Field(250, ge=32)
    grid: int = Field(4, ge=1)


class ChecksParams(_Section):
    """Great Expectations thresholds for the dataset manifest (see ``nucleiseg.validation``)."""

    min_side: int = Field(64, ge=1)
    max_side: int = Field(20000, ge=1)
    min_mean_intensity: float = Field(15.0, ge=0, le=255)  # an all-black tile is below this
    # An all-white (no tissue) tile is above this; real CoNSeP train_25, mostly glass, is 240.6.
    max_mean_intensity: float = Field(250.0, ge=0, le=255)
    min_intensity_std: float = Field(2.0, ge=0)  # a flat fill of any colour is below this
    max_nucleus_fraction: float = Field(0.8, gt=0, le=1)
    min_images: int = Field(3, ge=1)
    allow_duplicates: bool = False

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ChecksParams:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        if self.min_mean_intensity > self.max_mean_intensity:
            raise ValueError("min_mean_intensity must not exceed max_mean_intensity")
        return self


class AugmentationParams(_Section):
    crop: int = Field(224, ge=32)
    scale: tuple[float, float] = (0.75, 1.5)
    flip: bool = True
    rotate: float = Field(90.0, ge=0)
    affine_shear: float = Field(5.0, ge=0)
    elastic: bool = True
    elastic_alpha: float = 300.0  # albumentations 2 normalises the noise: 300/10 moves pixels ~2.4 px
    elastic_sigma: float = 10.0
    color_jitter: float = Field(0.0, ge=0)

    @field_validator("crop")
    @classmethod
    def _divisible_by_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("crop must be divisible by 32 (the encoder downsamples 5 times)")
        return v


class ModelParams(_Section):
    name: Literal["resunet34", "unet", "fcn8s"] = "resunet34"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"  # imagenet | none | path to a local checkpoint
    dropout: float = Field(0.1, ge=0, lt=1)
    num_classes: int = Field(5, ge=2)
    # Microns per pixel of the training images (CoNSeP and the synthetic data: 0.25, a 40x scan); recorded with
    # the model, so that slides and tiles at another resolution are resampled to it.
    mpp: float = Field(0.25, gt=0)


class LossParams(_Section):
    w0: float = Field(10.0, ge=0)
    sigma: float = Field(5.0, gt=0)
    vgg_weights: str = "imagenet"  # imagenet | none | path
    # Per-class factor on the pixel weight (background, tumor, lymphocyte, stroma inside, contour): "none"
    # (the paper), "balanced" (from the training set's target frequencies, see nucleiseg.data.class_weights)
    # or five numbers.
    class_weights: Literal["none", "balanced"] | tuple[float, float, float, float, float] = "none"

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, v: object) -> object:
        if isinstance(v, tuple) and not all(math.isfinite(w) and w > 0 for w in v):
            raise ValueError("class_weights must be five positive, finite numbers")
        return v


class TrainParams(_Section):
    epochs: int = Field(300, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the patches
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)  # the constant rate, or the peak of a one-cycle / cosine schedule
    # constant (the paper); onecycle: linear warm-up over `warmup` of the steps to `lr`, then cosine
    # annealing to lr/1e4 (torch's OneCycleLR); cosine: the same warm-up, then cosine to 0.
    schedule: Literal["constant", "onecycle", "cosine"] = "constant"
    warmup: float = Field(0.1, ge=0, lt=1)  # fraction of all optimizer steps
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(1e-4, ge=0)
    beta: float = Field(0.1, ge=0)  # weight of the perceptual loss; 0 skips VGG
    val_every: int = Field(1, ge=1)
    val_metric: str = "f1"
    # The checkpoint kept as best.pt: the best validation score ("best"), or the end of the schedule
    # ("last"; an annealed schedule ends at its best, and a few validation tiles pick noisily).
    select: Literal["best", "last"] = "best"
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)  # CPU threads; None: all cores
    out_dir: str = "models"


class InferParams(_Section):
    tile: int = Field(224, ge=32)
    overlap: int = Field(80, ge=0)
    batch_size: int = Field(8, ge=1)
    tta: bool = False
    # What runs the network's forward pass: torch, or onnxruntime (the network exported to ONNX on load and run
    # by ONNX Runtime on the CPU; an .onnx model from `nucleiseg export onnx` always runs on it). ONNX Runtime is
    # ~1.4x faster per tile on 2 CPU cores (1.1x per image), but exporting on load costs 6-7 s: torch is the default
    # (benchmarks/README.md)
    backend: Literal["torch", "onnxruntime"] = "torch"
    runner: Literal["threads", "dask"] = "threads"  # batch inference task runner (dask needs prefect-dask)
    workers: int = Field(2, ge=1)  # images processed at once by batch inference
    # runner dask: the scheduler of an existing cluster (tcp://host:8786); null: a local cluster of `workers`
    # processes
    dask_address: str | None = None

    @model_validator(mode="after")
    def _overlap_smaller_than_tile(self) -> InferParams:
        if self.tile % 32:
            raise ValueError("tile must be divisible by 32")
        if self.overlap >= self.tile:
            raise ValueError("overlap must be smaller than tile")
        return self


class PostParams(_Section):
    """Post-processing (nucleiseg.postprocess): the paper's connected components, or a watershed."""

    min_area: int = Field(20, ge=0)
    radius: int = Field(1, ge=0)
    method: Literal["paper", "watershed"] = "paper"
    classify: Literal["vote", "probability"] = "vote"
    mask_threshold: float = Field(0.5, ge=0, le=1)  # watershed: nucleus pixels have inside > this
    marker_threshold: float = Field(0.3, ge=-1, le=1)  # watershed: markers where inside - contour > this
    marker_min_area: int = Field(4, ge=0)  # watershed: smaller markers are dropped


class TissueParams(_Section):
    """Tissue detection on a slide thumbnail (definitions in ``nucleiseg.tissue``)."""

    mpp: float = Field(8.0, gt=0)  # thumbnail resolution, um per pixel
    min_saturation: int = Field(15, ge=0, le=255)  # Otsu's threshold on HSV saturation (0-255) clipped to
    max_saturation: int = Field(30, ge=0, le=255)  # [min_saturation, max_saturation]
    min_area_um2: float = Field(20000.0, ge=0)  # smaller pieces are dropped
    hole_area_um2: float = Field(50000.0, ge=0)  # smaller holes are filled
    dilation_um: float = Field(50.0, ge=0)

    @model_validator(mode="after")
    def _saturation_range(self) -> TissueParams:
        if self.min_saturation > self.max_saturation:
            raise ValueError("min_saturation must not exceed max_saturation")
        return self


class SlideParams(_Section):
    """Whole slides (definitions in ``nucleiseg.streaming`` and ``nucleiseg.wsi``)."""

    chunk: int = Field(5120, ge=64)  # side of a chunk in model pixels, rounded up to whole inference tiles
    margin_um: float = Field(30.0, gt=0)  # context around each chunk; must exceed the largest nucleus
    mpp_tolerance: float = Field(0.02, ge=0, lt=0.5)  # relative mpp difference read without resampling
    map_mpp: float = Field(16.0, gt=0)  # resolution of the class map / density thumbnail, um per pixel
    tissue: TissueParams = TissueParams()


class EvalParams(_Section):
    ignore_suffix: str = "_other"
    out: str = "reports/metrics.json"
    protocol: Literal["paper", "hovernet", "both"] = "both"  # nucleiseg.evaluation.PROTOCOLS


class PromoteParams(_Section):
    model_name: str = "nucleiseg"
    metric: str = "all.f1"  # a figure with a known direction (nucleiseg.registry.metric_direction), not a count
    tie_breaker: str = "all.dice"
    # Whether the register stage adds a version (nucleiseg.registration.RegisterMode): auto registers every run
    # but a DVC experiment (`dvc exp run`), always registers experiments too, never nothing.
    registration: Literal["auto", "always", "never"] = "auto"

    @field_validator("metric", "tie_breaker")
    @classmethod
    def _known_direction(cls, v: str) -> str:
        from nucleiseg.registry import metric_direction

        metric_direction(v)  # ValueError for counts and unknown names
        return v


class TuneParams(_Section):
    """Optuna search (``nucleiseg tune``; definitions in ``nucleiseg.tuning``)."""

    n_trials: int = Field(20, ge=1)
    storage: str = "sqlite:///mlruns/optuna.db"  # an RDB URL, or a journal file path ending .log / .journal
    study: str = Field("nucleiseg-tune", min_length=1)
    seed: int = 0
    objective: Literal["f1", "dice", "aji", "pq", "accuracy", "hausdorff"] = "f1"  # validation figure
    epochs: int = Field(5, ge=1)  # training epochs per trial (replaces train.epochs)
    beta: tuple[float, float] = (0.0, 1.0)  # a range starting at 0 adds a perceptual on/off switch
    w0: tuple[float, float] = (1.0, 20.0)
    sigma: tuple[float, float] = (1.0, 10.0)
    # searched only with post.method: watershed
    marker_threshold: tuple[float, float] = (0.0, 0.6)
    mask_threshold: tuple[float, float] = (0.3, 0.7)
    pruner_startup_trials: int = Field(5, ge=0)  # median pruning starts once this many trials have finished
    pruner_warmup_epochs: int = Field(1, ge=0)  # and never stops a trial within its first epochs
    out: str = "reports/best_params.yaml"  # the best settings, applied with `nucleiseg tune --apply`

    @model_validator(mode="after")
    def _ranges_ordered(self) -> TuneParams:
        for name in ("beta", "w0", "sigma", "marker_threshold", "mask_threshold"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: the range [{low}, {high}] is empty (low > high)")
        if self.beta[0] < 0 or self.w0[0] < 0 or self.sigma[0] <= 0:
            raise ValueError("beta and w0 ranges must start at >= 0, the sigma range at > 0")
        return self


class ScheduleParams(_Section):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    # The inbox watcher announces a change once no file has been added or written for this long: a burst of
    # files, or one large file still being copied, becomes one retraining run.
    inbox_quiet_s: float = Field(10.0, gt=0)


class TrackingParams(_Section):
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: str = "mlruns/artifacts"
    experiment: str = "nucleiseg"


class SpatialParams(_Section):
    """Per-nucleus measurements and the spatial statistics of the types (nucleiseg.measure, nucleiseg.spatial)."""

    mpp: float = Field(0.25, gt=0)  # um per pixel of a label given to `nucleiseg spatial` without --mpp
    r_max_um: float = Field(50.0, gt=0)  # largest Ripley K / L radius (capped at a quarter of the window)
    r_steps: int = Field(50, ge=1)
    simulations: int = Field(39, ge=1)  # patterns simulated for the L-function envelopes
    envelope_null: Literal["csr", "labels"] = "csr"  # complete spatial randomness, or random labelling
    max_points: int = Field(20000, ge=2)  # per class for K / L: a random subsample above (K is thinning-invariant)
    contact_radius_um: float = Field(20.0, gt=0)  # "fraction of tumour nuclei with a lymphocyte within r"
    neighbourhood_radius_um: float = Field(20.0, gt=0)  # radius graph of the neighbourhood enrichment
    permutations: int = Field(199, ge=2)  # label permutations of the neighbourhood enrichment
    grid_um: float = Field(100.0, gt=0)  # Morisita-Horn grid cell side
    density_bandwidth_um: float = Field(25.0, gt=0)  # Gaussian smoothing of the report's density maps
    seed: int = 0


class Params(_Section):
    data: DataParams = DataParams()
    stain: StainParams = StainParams()
    split: SplitParams = SplitParams()
    patches: PatchParams = PatchParams()
    checks: ChecksParams = ChecksParams()
    augmentation: AugmentationParams = AugmentationParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    train: TrainParams = TrainParams()
    infer: InferParams = InferParams()
    post: PostParams = PostParams()
    slide: SlideParams = SlideParams()
    eval: EvalParams = EvalParams()
    promote: PromoteParams = PromoteParams()
    tune: TuneParams = TuneParams()
    schedule: ScheduleParams = ScheduleParams()
    tracking: TrackingParams = TrackingParams()
    spatial: SpatialParams = SpatialParams()

    @model_validator(mode="after")
    def _crop_fits_patches(self) -> Params:
        if self.augmentation.crop > self.patches.size:
            raise ValueError(
                f"augmentation.crop ({self.augmentation.crop}) is larger than patches.size ({self.patches.size})"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """All settings as ``{"section.key": value}``, for logging to MLflow."""
        return _flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        """A short hash of the settings, recorded on models to tell apart configurations."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping holds the same key twice; the message names the key and both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping holding the same key twice is an error (PyYAML keeps the last
    one silently, so a forgotten duplicate in params.yaml would override the line above it unseen)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if first is not None:
            line = key_node.start_mark.line + 1
            raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first on line {first + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(text: str) -> Any:
    """Parse YAML safely, refusing duplicate keys (:class:`yaml.YAMLError` names the line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ParamsError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ParamsError(f"--set {assignment!r}: {key} is not a section")
    try:
        node[keys[-1]] = read_yaml(raw)
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {assignment!r}: not a valid YAML value ({exc})") from None


def load_params(path: str | os.PathLike[str] | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate the settings. ``path=None`` starts from the defaults."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"{p}: params file not found")
        try:
            tree = read_yaml(p.read_text()) or {}
        except DuplicateKeyError as exc:
            raise ParamsError(f"{p}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ParamsError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ParamsError(f"{p}: expected a mapping of sections at the top level")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "params"
            lines.append(f"  {where}: {err['msg']}")
        raise ParamsError(f"invalid params ({path}):\n" + "\n".join(lines)) from None
