"""The trained model as an MLflow pyfunc: an RGB image in, the nuclei label out, and no pickle anywhere.

Definitions
-----------
the pyfunc model
    ``mlflow.pyfunc.load_model(uri).predict(rgb, params={"mpp": 0.5})``: ``rgb`` is an ``(H, W, 3)`` ``uint8``
    RGB image of any size; the result is the ``(H, W)`` ``int32`` nuclei label in the project's encoding
    (0 background; an id > 0 is one nucleus of class ``id % 3``: 0 tumor, 1 lymphocyte, 2 stroma). Inside it
    runs :class:`nucleiseg.infer.Predictor`, the code of ``nucleiseg predict``: the model's stain normalisation,
    tiled inference with its tile, overlap, batch size and TTA setting, and its post-processing.
params
    ``mpp``: the image's microns per pixel (default: the model's own, :data:`PARAM_MPP`). Beyond
    ``nucleiseg.wsi.DEFAULT_MPP_TOLERANCE`` (2%) of the model's, the image is resampled to the model's resolution
    for the network and the label brought back to the image's pixels by nearest neighbour, as
    ``nucleiseg predict --mpp`` does. ``tta``: test-time augmentation on or off (default: the model's setting).
the saved model (an MLflow model folder, flavour ``python_function``)
    ``artifacts/weights.safetensors``: the network's state dict (safetensors holds tensors and names only; it
    is read without running any code). ``artifacts/config.json``: everything else the predictor needs
    (:data:`CONFIG_KEYS`, the checkpoint contract of :func:`nucleiseg.infer.load_predictor`) and ``format``
    (:data:`FORMAT`). ``code/nucleiseg/``: this package's source, put on ``sys.path`` by MLflow when it loads
    the model (nucleiseg is not published on a package index, so a pinned requirement could not be installed
    anywhere else; the code copy is also exactly the code the model was trained with). ``model_code.py``: the
    "models from code" entry (MLflow 3): MLflow runs this file to obtain the :class:`NucleisegModel` instead of
    unpickling one. ``requirements.txt``: the distributions that loading and predicting import
    (:data:`REQUIREMENTS`), pinned to the versions the model was saved with, plus MLflow itself.
loading
    ``mlflow.pyfunc.load_model`` runs the model's copy of the code (as any pyfunc model does: load models from a
    store you trust). :func:`nucleiseg.infer.load_predictor` on the same URI reads only the two artifacts, with
    the installed nucleiseg: no pickle and no code from the store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from nucleiseg.infer import ModelLoadError, Predictor, predictor_from_state_dict

if TYPE_CHECKING:
    import torch
    from mlflow.models import ModelSignature

FORMAT = "nucleiseg-pyfunc/1"
WEIGHTS = "weights"  # artifact names, as the pyfunc flavour's ``artifacts`` mapping records them
CONFIG = "config"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
CONFIG_KEYS = ("model_name", "model_kwargs", "norm_mean", "norm_std", "stain", "infer", "post", "mpp")
PARAM_MPP = "mpp"
PARAM_TTA = "tta"
# What loading and predicting import (nucleiseg.infer, .models, .postprocess, .stain, .wsi and their imports),
# checked by tests/test_mlflow_model.py in an isolated interpreter: torchvision for the FCN-8s VGG layers that
# nucleiseg.models imports, timm for the encoders, scipy and scikit-image for post-processing, OpenCV for the
# stain normalisation and resampling, safetensors for the weights.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scipy",
    "scikit-image",
    "opencv-python-headless",
    "safetensors",
)
# The models-from-code entry: MLflow executes it at load time (nothing is unpickled); it only names the class.
MODEL_CODE = '''"""MLflow "models from code" entry of the nucleiseg pyfunc model (see nucleiseg/mlflow_model.py)."""

import mlflow

from nucleiseg.mlflow_model import NucleisegModel

mlflow.models.set_model(NucleisegModel())
'''


class NucleisegModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model (see the module docstring): ``predict(rgb, params)`` returns the nuclei label."""

    predictor: Predictor

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        artifacts = context.artifacts
        self.predictor = predictor_from_files(artifacts[WEIGHTS], artifacts[CONFIG], device="auto")

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        params = params or {}
        return segment(self.predictor, np.asarray(model_input), mpp=params.get(PARAM_MPP), tta=params.get(PARAM_TTA))


def segment(predictor: Predictor, image: np.ndarray, mpp: float | None = None, tta: bool | None = None) -> np.ndarray:
    """The ``(H, W)`` ``int32`` nuclei label of an ``(H, W, 3)`` ``uint8`` RGB image at ``mpp`` microns per pixel
    (None: the model's), with the predictor's settings (``tta`` overrides its TTA setting)."""
    from nucleiseg.wsi import rescale, resize_label

    if mpp is not None and (
        isinstance(mpp, bool) or not (isinstance(mpp, int | float) and np.isfinite(mpp) and mpp > 0)
    ):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    seen = image if mpp is None else rescale(image, float(mpp), predictor.mpp)
    label = predictor.label(seen, tta=None if tta is None else bool(tta))
    if seen is not image:
        label = resize_label(label, image.shape[:2])
    return label.astype(np.int32, copy=False)


# ----------------------------------------------------------------------------------------------------------
# Writing and reading the artifacts
# ----------------------------------------------------------------------------------------------------------


def model_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a model: :data:`CONFIG_KEYS` taken from ``values`` (the checkpoint contract; a
    missing optional entry is null), plus :data:`FORMAT`. ``model_name`` defaults to ``model_kwargs["name"]``."""
    values = dict(values)
    kwargs = dict(values.get("model_kwargs") or {})
    values.setdefault("model_name", kwargs.get("name"))
    missing = [k for k in ("model_name", "norm_mean", "norm_std") if values.get(k) is None]
    if missing:
        raise ValueError(f"the model's config lacks {', '.join(missing)}")
    config = {"format": FORMAT, **{k: values.get(k) for k in CONFIG_KEYS}}
    config["model_kwargs"] = kwargs
    json.dumps(config, allow_nan=False)  # fails here, naming nothing stored yet, on a value JSON cannot hold
    return config


def write_artifacts(
    model: torch.nn.Module, config: Mapping[str, Any], folder: str | os.PathLike[str]
) -> dict[str, str]:
    """Write ``weights.safetensors`` (the state dict, on the CPU) and ``config.json`` (:func:`model_config`) into
    ``folder``; return the pyfunc ``artifacts`` mapping (name to path)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(model_config(config), indent=2, allow_nan=False) + "\n")
    return {WEIGHTS: str(folder / WEIGHTS_FILE), CONFIG: str(folder / CONFIG_FILE)}


def predictor_from_files(
    weights: str | os.PathLike[str],
    config: str | os.PathLike[str],
    device: str = "auto",
    source: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> Predictor:
    """A :class:`Predictor` from ``weights.safetensors`` and ``config.json`` (nothing unpickled, no code run).

    Raises :class:`nucleiseg.infer.ModelLoadError` naming the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = source or str(Path(weights).parent)
    try:
        values = json.loads(Path(config).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: not a readable model config ({exc})") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        found = values.get("format") if isinstance(values, dict) else type(values).__name__
        raise ModelLoadError(f"{config}: not a nucleiseg model config (format {found!r}, expected {FORMAT!r})")
    try:
        state = load_file(os.fspath(weights), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"{weights}: not readable safetensors weights ({exc})") from None
    record = {k: v for k, v in values.items() if k != "stain"}
    return predictor_from_state_dict(state, values, device, source, {**record, **dict(info or {})})


def is_pyfunc_model(flavors: Mapping[str, Any]) -> bool:
    """Whether an MLmodel's ``flavors`` are this module's format (a pyfunc with the weights and config)."""
    pyfunc = flavors.get(mlflow.pyfunc.FLAVOR_NAME) or {}
    return "pytorch" not in flavors and {WEIGHTS, CONFIG} <= set(pyfunc.get("artifacts") or {})


def predictor_from_folder(
    folder: str | os.PathLike[str],
    device: str = "auto",
    source: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> Predictor:
    """A :class:`Predictor` from a saved model folder (its ``MLmodel`` names the artifacts' paths)."""
    from mlflow.models import Model

    folder = Path(folder)
    try:
        flavors = Model.load(folder / "MLmodel").flavors
        artifacts = flavors[mlflow.pyfunc.FLAVOR_NAME]["artifacts"]
        weights, config = (folder / artifacts[key]["path"] for key in (WEIGHTS, CONFIG))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: not a nucleiseg pyfunc model ({type(exc).__name__}: {exc})") from None
    return predictor_from_files(weights, config, device, source or str(folder), info)


# ----------------------------------------------------------------------------------------------------------
# Saving and logging
# ----------------------------------------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the installed versions. A local version label is dropped (``torch
    2.14.1+cu130`` is pinned as ``torch==2.14.1``), which a CPU-only index satisfies with its ``+cpu`` build."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            raise RuntimeError(f"{name} is not installed; the model's environment needs it") from None
    return pinned


def signature(tta: bool) -> ModelSignature:
    """Tensor in (``uint8``, ``(-1, -1, 3)``: one RGB image of any size), tensor out (``int32``, ``(-1, -1)``),
    params ``mpp`` (default: the model's own) and ``tta`` (default: the model's setting)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1))]),
        params=ParamSchema([ParamSpec(PARAM_MPP, "double", None), ParamSpec(PARAM_TTA, "boolean", bool(tta))]),
    )


def _model_arguments(
    model: torch.nn.Module, config: Mapping[str, Any], example: np.ndarray, folder: Path
) -> dict[str, Any]:
    """The keyword arguments of ``mlflow.pyfunc.save_model`` / ``log_model`` for ``model``, with the files they
    name written under ``folder`` (a temporary folder: MLflow copies what it needs)."""
    example = np.asarray(example)
    if example.ndim != 3 or example.shape[2] != 3 or example.dtype != np.uint8:
        raise ValueError(f"the input example must be an (H, W, 3) uint8 RGB image, got {example.dtype} {example.shape}")
    config = model_config(config)
    artifacts = write_artifacts(model, config, folder / "artifacts")
    code = folder / "code" / "nucleiseg"
    shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    entry = folder / "model_code.py"
    entry.write_text(MODEL_CODE)
    return {
        "python_model": str(entry),
        "artifacts": artifacts,
        "code_paths": [str(code)],
        "signature": signature(bool((config.get("infer") or {}).get("tta", False))),
        "input_example": example,
        "pip_requirements": pip_requirements(),
        "metadata": {"format": FORMAT, "model_name": config["model_name"], "mpp": config["mpp"]},
    }


def save_model(
    path: str | os.PathLike[str], model: torch.nn.Module, config: Mapping[str, Any], example: np.ndarray
) -> None:
    """Save ``model`` (the network) with ``config`` (the checkpoint contract's other entries) as a pyfunc model
    folder at ``path``; ``example`` is a small RGB image (the input example)."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(os.fspath(path), **_model_arguments(model, config, example, Path(tmp)))


def log_model(
    model: torch.nn.Module, config: Mapping[str, Any], example: np.ndarray, name: str = "model"
) -> mlflow.models.model.ModelInfo:
    """Log ``model`` as a pyfunc model (a LoggedModel of the active run); return MLflow's ``ModelInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(name=name, **_model_arguments(model, config, example, Path(tmp)))


def example_crop(image: np.ndarray, size: int = 64) -> np.ndarray:
    """The central ``size`` x ``size`` crop of an RGB image (the input example: a few kB, not megabytes)."""
    h, w = image.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(image[top : top + size, left : left + size])


__all__ = [
    "CONFIG_KEYS",
    "FORMAT",
    "REQUIREMENTS",
    "NucleisegModel",
    "example_crop",
    "is_pyfunc_model",
    "log_model",
    "model_config",
    "pip_requirements",
    "predictor_from_files",
    "predictor_from_folder",
    "save_model",
    "segment",
    "signature",
    "write_artifacts",
]
