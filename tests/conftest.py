"""Shared fixtures. Real CoNSeP tiles come from ../shared/realdata/consep and are skipped when absent."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def consep_dir() -> Path:
    """The real CoNSeP training tiles (``<tile>.png``, ``_label.png``, ``_other.png``)."""
    if not (CONSEP_DIR / "train_1_label.png").is_file():
        pytest.skip(f"real CoNSeP tiles not found at {CONSEP_DIR}")
    return CONSEP_DIR
