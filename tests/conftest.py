"""Shared fixtures. Real CoNSeP tiles come from ../shared/realdata/consep and are skipped when absent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSEP_DIR = Path(os.environ.get("NUCLEISEG_CONSEP_DIR", REPO.parent / "shared" / "realdata" / "consep" / "train"))

# Keep tests offline and quiet; the library never needs these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _keep_mlflow_uri_variables() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# MLflow's ``set_tracking_uri`` / ``set_registry_uri`` export ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``; a
# test or a module fixture (its teardown included) that calls them directly would hand its store to every later
# test's subprocesses (``dvc repro``). Autouse fixtures of the widest scope are set up first and torn down last.
_mlflow_uri_variables_stay_per_module = pytest.fixture(scope="module", autouse=True)(_keep_mlflow_uri_variables)
_mlflow_uri_variables_stay_per_test = pytest.fixture(autouse=True)(_keep_mlflow_uri_variables)


@pytest.fixture(scope="session")
def consep_dir() -> Path:
    """The real CoNSeP training tiles (``<tile>.png``, ``_label.png``, ``_other.png``)."""
    if not (CONSEP_DIR / "train_1_label.png").is_file():
        pytest.skip(f"real CoNSeP tiles not found at {CONSEP_DIR}")
    return CONSEP_DIR


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API server (own database and result storage) for the session: a start costs 15-40 s."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    with (
        temporary_settings(
            updates={
                PREFECT_HOME: home,
                PREFECT_LOCAL_STORAGE_PATH: home / "storage",
                PREFECT_LOGGING_TO_API_ENABLED: False,
            }
        ),
        prefect_test_harness(server_startup_timeout=120),  # generous: the server starts slowly on a loaded machine
    ):
        yield


# A tiny prepared dataset shared by the training, scoring and pipeline tests: 6 synthetic 256x256 tiles,
# 128x128 patches (2x2 grid), 96x96 crops, and a model small enough to train a few steps in seconds.
TINY_SETTINGS = [
    "data.synth.n_images=6",
    "data.synth.size=256",
    "patches.size=128",
    "patches.grid=2",
    "augmentation.crop=96",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.threads=2",
    "model.encoder_weights=none",
    "loss.vgg_weights=none",
    "infer.tile=96",
    "infer.overlap=32",
    "infer.batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nucleiseg.synth import write_dataset

    folder = tmp_path_factory.mktemp("tiny") / "synthetic"
    write_dataset(folder, n_images=6, size=256, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_prepared(prefect_api: None, tiny_dataset: Path) -> Path:
    """The preprocessing flow's output for :func:`tiny_dataset` (4 train, 1 val, 1 test tiles)."""
    from nucleiseg.params import load_params
    from pipelines.preprocess import preprocess_from_params

    out = tiny_dataset.parent / "prepared"
    preprocess_from_params(load_params(None, TINY_SETTINGS), tiny_dataset, out)
    return out


# A checkpoint of a small random network (ResUNet with a MobileNetV3-small-0.5 encoder, no stain step) that
# :func:`nucleiseg.infer.load_predictor` reads: for tests that need a real model but not a trained one.
TINY_MODEL_KWARGS = {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1}
TINY_INFER = {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False}


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    import warnings

    import torch

    from nucleiseg.models import create_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights offline: expected
        kwargs = {k: v for k, v in TINY_MODEL_KWARGS.items() if k != "name"}
        model = create_model("resunet34", encoder_weights="none", **kwargs).eval()
    torch.save(
        {
            "model_name": "resunet34",
            "model_kwargs": TINY_MODEL_KWARGS,
            "state_dict": model.state_dict(),
            "norm_mean": [0.7, 0.5, 0.7],
            "norm_std": [0.15, 0.2, 0.15],
            "stain": None,
            "infer": TINY_INFER,
            "post": {"min_area": 5, "radius": 1},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a small random network (see :func:`write_tiny_checkpoint`)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model") / "model.pt")
