"""The results report and the presets: rendered from real metric summaries, applied to a real params file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.metrics import evaluate_image, summarize
from nucleiseg.params import ParamsError, load_params
from nucleiseg.presets import apply_settings, read_settings, resolve_preset
from nucleiseg.report import REFERENCES, render

ROOT = Path(__file__).resolve().parent.parent


def _disk_label(centres: list[tuple[int, int, int]], shape=(64, 64), radius=5) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    label = np.zeros(shape, np.int32)
    for y, x, nucleus_id in centres:
        label[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = nucleus_id
    return label


def _evaluation() -> dict:
    gt = _disk_label([(10, 10, 3), (10, 40, 4), (40, 10, 5), (40, 40, 6)])  # tumor, lymph., stroma, tumor
    pred = _disk_label([(10, 11, 3), (10, 40, 7), (40, 10, 4)])  # one missed, one stroma called lymphocyte
    images = {"tile_a": evaluate_image(pred, gt), "tile_b": evaluate_image(gt, gt)}
    return {"images": images, "summary": summarize(images), "model": "models/best.pt", "split": "test"}


def test_report_shows_the_measured_figures_and_the_reference(tmp_path: Path) -> None:
    evaluation = _evaluation()
    summary = evaluation["summary"]
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "tile_a.png").write_bytes(b"")
    settings = load_params(ROOT / "params.yaml").flat()
    train_summary = {"epochs": 3, "seconds": 120.0, "best_score": 0.5, "best_epoch": 2, "val_metric": "f1"}
    text = render(
        evaluation,
        settings,
        tmp_path / "reports" / "r.md",
        train_summary={**train_summary, "encoder_pretrained": False},
        compare=["hovernet-consep"],
        overlay_dir=overlays,
    )
    assert f"| {summary['all']['f1']:.3f} |" in text.replace(" this run | ", "| ")
    assert f"{summary['all']['aji']:.3f}" in text and f"mPQ+ {summary['mpq_plus']:.3f}" in text
    # Confusion: the stroma nucleus of tile_a was called lymphocyte; tile_b is perfect.
    assert "| Stroma | 0 (0.0%) | 1 (50.0%) | 1 (50.0%) | 2 |" in text
    assert "| tile_a | 4 | 3 |" in text and "| tile_b | 4 | 4 | 1.000 |" in text
    for value in REFERENCES["hovernet-consep"].figures.values():
        assert f"| {value:.3f} |" in text
    assert "centroids lie within 12 px" in text
    assert "![tile_a](../overlays/tile_a.png)" in text
    assert "randomly initialised" in text and "could not load them" in text
    assert "2.0 min" in text
    with pytest.raises(ValueError, match="unknown reference"):
        render(evaluation, settings, tmp_path / "r.md", compare=["nope"])


def test_report_command_writes_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    Path("reports").mkdir()
    evaluation = _evaluation()
    Path("reports/metrics.json").write_text(json.dumps(evaluation, default=lambda v: None).replace("NaN", "null"))
    result = CliRunner().invoke(app, ["report", "--out", "reports/results.md"])
    assert result.exit_code == 0, result.output
    text = Path("reports/results.md").read_text()
    assert text.startswith("# Results on the test split") and "## Table 2" in text
    assert "## Training" in text and "Trained" not in text  # no train_summary.json: no training line
    Path("reports/metrics.json").write_text("{")
    result = CliRunner().invoke(app, ["report", "--out", "reports/results.md"])
    assert result.exit_code == 1 and "reports/metrics.json" in result.output
    assert Path("reports/results.md").read_text() == text  # the earlier report is kept


@pytest.mark.parametrize("name", ["cpu-1h", "paper"])
def test_presets_apply_to_params_yaml_and_validate(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    preset = resolve_preset(name)
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    before = target.read_text()
    changes = apply_settings(preset, target)
    after = load_params(target).flat()
    values = read_settings(preset)
    assert changes.keys() == values.keys()
    for key, value in values.items():
        assert after[key] == value or list(after[key]) == value, key
    # Only the preset's lines changed; the comments of the file are kept.
    changed = [a for a, b in zip(before.splitlines(), target.read_text().splitlines(), strict=True) if a != b]
    assert 0 < len(changed) <= len(values)
    assert "# nucleiseg settings" in target.read_text()


def test_preset_command_names_unknown_presets_and_keeps_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "presets", "presets")
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    original = Path("params.yaml").read_text()
    result = CliRunner().invoke(app, ["preset", "gpu-2h"])
    assert result.exit_code == 1 and "gpu-2h: no such preset (known: cpu-1h, paper)" in result.output
    Path("bad.yaml").write_text(yaml.safe_dump({"params": {"train.beta": -1.0}}))
    result = CliRunner().invoke(app, ["preset", "bad.yaml"])
    assert result.exit_code == 1 and "beta" in result.output
    assert Path("params.yaml").read_text() == original
    result = CliRunner().invoke(app, ["preset", "cpu-1h"])
    assert result.exit_code == 0, result.output
    assert load_params("params.yaml").data.dir == "data"
    with pytest.raises(ParamsError, match="settings file not found"):
        read_settings("missing.yaml")


def test_training_lines_say_how_the_scored_checkpoint_was_chosen_and_how_nuclei_were_made() -> None:
    from nucleiseg.report import training_lines

    settings = load_params(None, ["train.schedule=onecycle", "post.method=watershed", "post.classify=probability"])
    flat = settings.flat()
    summary = {"epochs": 40, "seconds": 1800, "val_metric": "f1", "best_score": 0.6, "best_epoch": 40}
    last = "\n".join(training_lines({**summary, "select": "last"}, flat))
    assert "the last epoch's checkpoint is the one scored (validation f1 0.600)" in last
    assert "(onecycle, 0.1 warm-up)" in last and "watershed (nucleus pixels: inside > 0.5" in last
    assert "summed class probability" in last
    best = "\n".join(training_lines({**summary, "select": "best"}, load_params(None, []).flat()))
    assert "best validation f1 0.600 at epoch 40" in best and "connected components of the argmax" in best
