"""The slide path (nucleiseg.streaming, ``nucleiseg slide``) on real slide files written by nucleiseg.slidegen:
exactly the tile path's nuclei whatever the chunk size, 20x against 40x, glass, a slide smaller than a chunk,
a user's mask, unknown resolution, a corrupt slide, and a run killed mid-slide then resumed."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nucleiseg.infer import InferSettings, PostSettings, Predictor
from nucleiseg.slidegen import write_slide
from nucleiseg.spatial import SpatialSettings
from nucleiseg.streaming import SlideSettings, chunk_grid, segment_slide, slide_output_paths
from nucleiseg.synth import synth_tile

REPO = Path(__file__).resolve().parents[1]
INFER = InferSettings(tile=128, overlap=32, batch_size=1, tta=False)  # stride 96
POST = PostSettings(min_area=20, radius=1)
# No spatial report (its plots take seconds) but in the one test that checks it is written, with few simulations.
SPATIAL = False
QUICK_SPATIAL = SpatialSettings(r_steps=5, simulations=2, permutations=3)
MEASURED = ["class", "class_probability", "centroid_x_um", "centroid_y_um", "area_um2", "perimeter_um",
            "eccentricity", "solidity", "hematoxylin_od_mean", "eosin_od_std"]  # fmt: skip


class DarkNuclei(torch.nn.Module):
    """A deterministic stand-in network: the 5 maps score how close the 5x5 mean darkness of a pixel is to a
    level per map (background pale; tumor, then lymphocyte, darker). Its output depends on the neighbourhood
    and is zero-padded at tile edges, so where tiles fall matters, as with a real network."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(5, stride=1, padding=2)
        self.register_buffer("levels", torch.tensor([0.22, 0.38, 0.55, 9.0, 9.0]).view(1, 5, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -30 * (self.pool(1 - x.mean(1, keepdim=True)) - self.levels).abs()


def dark_predictor() -> Predictor:
    # mean 0, std 1: the network sees rgb / 255.
    return Predictor(model=DarkNuclei().eval(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), infer=INFER, post=POST)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return synth_tile(3, (900, 1000))[0]


def tile_table(predictor: Predictor, image: np.ndarray, mpp: float = 0.25) -> tuple[np.ndarray, pd.DataFrame]:
    """The tile path: the whole image through the predictor, then the measurement table."""
    from nucleiseg.measure import nuclei_table

    label = predictor.label(image)
    table = nuclei_table(label, image, mpp=mpp, probs=predictor.probabilities(image, dtype=np.float16))
    return label, table.sort_values(["centroid_y_px", "centroid_x_px"], ignore_index=True)


def slide_features(summary: dict) -> set[tuple[int, tuple]]:
    with gzip.open(summary["outputs"]["geojson"], "rt", encoding="utf-8") as fh:
        features = json.load(fh)["features"]
    return {
        (f["properties"]["measurements"]["id"] % 3, tuple(map(tuple, f["geometry"]["coordinates"][0])))
        for f in features
    }


def test_a_slide_made_of_a_tile_gives_exactly_the_tile_paths_nuclei_whatever_the_chunk_size(
    tmp_path: Path, tile: np.ndarray
) -> None:
    from nucleiseg.export import nucleus_polygons

    predictor = dark_predictor()
    label, expected = tile_table(predictor, tile)
    rings = {(i % 3, tuple(map(tuple, r.tolist()))) for i, r in nucleus_polygons(label).items()}
    assert len(rings) > 100 and len(set(expected["class"])) >= 2
    path = write_slide(tmp_path / "tile.tif", tile, 0.25)  # lossless: the slide holds the tile's pixels
    for chunk in (150, 400, 5000):  # 2 and 5 inference tiles a side, and the whole slide in one chunk
        settings = SlideSettings(chunk=chunk, margin_um=20.0)
        cores = chunk_grid((900, 1000), INFER.tile, INFER.overlap, chunk, 80)
        cut = {  # nuclei of the tile path that a chunk border runs through
            i for i, r in nucleus_polygons(label).items()
            for c in cores if r[:, 1].min() < c.core[0] < r[:, 1].max() or r[:, 0].min() < c.core[2] < r[:, 0].max()
        }  # fmt: skip
        assert chunk == 5000 or len(cut) > 5
        spatial = QUICK_SPATIAL if chunk == 5000 else SPATIAL
        summary = segment_slide(path, predictor, tmp_path / f"out{chunk}", settings=settings, spatial=spatial)
        assert summary["clipped"] == 0 and summary["chunks"]["on_tissue"] == len(cores)
        assert slide_features(summary) == rings  # the same nuclei, pixel for pixel, each once
        table = pd.read_parquet(summary["outputs"]["nuclei"])
        table = table.sort_values(["centroid_y_px", "centroid_x_px"], ignore_index=True)
        pd.testing.assert_frame_equal(table[MEASURED], expected[MEASURED], rtol=1e-6)
        assert (table["id"] % 3).tolist() == [("tumor", "lymphocyte", "stroma").index(c) for c in table["class"]]
        assert summary["nuclei"] == len(rings) and not (tmp_path / f"out{chunk}" / ".tile.chunks").exists()
    paths = slide_output_paths(tmp_path / "out5000", "tile")
    assert all(p.is_file() for p in paths.values()) and summary["spatial_report"] == "written"
    assert set(summary["outputs"]) == set(paths)
    assert summary["view"]["resampled"] is False and summary["mpp_source"] == "metadata"


def test_a_20x_slide_gives_the_nuclei_of_the_40x_slide(tmp_path: Path, tile: np.ndarray) -> None:
    import cv2
    from scipy.spatial import cKDTree

    predictor = dark_predictor()
    settings = SlideSettings(chunk=300, margin_um=20.0)
    s40 = segment_slide(
        write_slide(tmp_path / "s40.tif", tile, 0.25), predictor, tmp_path / "o40", settings=settings, spatial=SPATIAL
    )
    small = cv2.resize(tile, (500, 450), interpolation=cv2.INTER_AREA)
    s20 = segment_slide(
        write_slide(tmp_path / "s20.tif", small, 0.5), predictor, tmp_path / "o20", settings=settings, spatial=SPATIAL
    )
    assert s20["view"]["resampled"] and s20["view"]["size"] == [1000, 900] and s20["slide_mpp"] == [0.5, 0.5]
    t40 = pd.read_parquet(s40["outputs"]["nuclei"])
    t20 = pd.read_parquet(s20["outputs"]["nuclei"])
    # Level-0 pixels of each slide: half as many at 20x; micrometres: the same.
    np.testing.assert_allclose(t20["centroid_x_px"] * 0.5, t20["centroid_x_um"])
    big = t40[t40["area_um2"] >= 8.0]  # nuclei of 128 px and more at 40x; resampling reshapes the smallest
    distance, nearest = cKDTree(t20[["centroid_x_um", "centroid_y_um"]]).query(big[["centroid_x_um", "centroid_y_um"]])
    matched = distance < 1.5  # um: six 40x pixels
    assert matched.mean() > 0.9
    pairs = t20.iloc[nearest[matched]]
    assert (pairs["class"].to_numpy() == big["class"].to_numpy()[matched]).mean() > 0.95
    ratio = pairs["area_um2"].to_numpy() / big["area_um2"].to_numpy()[matched]
    assert 0.85 < np.median(ratio) < 1.15
    assert abs(s20["nuclei"] - s40["nuclei"]) < 0.25 * s40["nuclei"]


def test_glass_a_slide_smaller_than_a_chunk_and_a_users_mask(tmp_path: Path, tile: np.ndarray) -> None:
    from nucleiseg.io import write_image

    predictor = dark_predictor()
    rng = np.random.default_rng(0)
    glass = np.clip(241 + rng.normal(0, 2, (1200, 1500, 3)), 0, 255).astype(np.uint8)
    summary = segment_slide(
        write_slide(tmp_path / "glass.tif", glass, 0.25), predictor, tmp_path / "g", spatial=SPATIAL
    )
    assert summary["nuclei"] == 0 and summary["chunks"]["on_tissue"] == 0 and summary["tissue_mm2"] == 0
    assert len(pd.read_parquet(summary["outputs"]["nuclei"]).columns) > 10
    with gzip.open(summary["outputs"]["geojson"], "rt") as fh:
        assert json.load(fh) == {"type": "FeatureCollection", "features": []}

    small = tile[:260, :300]  # a third of a default chunk, about two inference tiles
    summary = segment_slide(
        write_slide(tmp_path / "small.tif", small, 0.25), predictor, tmp_path / "s", spatial=SPATIAL
    )
    assert summary["chunks"] == {"total": 1, "on_tissue": 1, "computed": 1, "reused": 0}
    from nucleiseg.export import nucleus_polygons

    rings = {(i % 3, tuple(map(tuple, r.tolist()))) for i, r in nucleus_polygons(predictor.label(small)).items()}
    assert slide_features(summary) == rings and rings

    mask = np.zeros((36, 40), np.uint8)
    mask[:, :20] = 255  # the left half of the 900 x 1000 slide
    write_image(tmp_path / "mask.png", mask)
    path = write_slide(tmp_path / "masked.tif", tile, 0.25)
    settings = SlideSettings(chunk=300, margin_um=20.0)
    full = segment_slide(path, predictor, tmp_path / "full", settings=settings, spatial=SPATIAL)
    half = segment_slide(
        path, predictor, tmp_path / "half", settings=settings, mask_path=tmp_path / "mask.png", spatial=SPATIAL
    )
    assert half["tissue_mask"] == str(tmp_path / "mask.png")
    assert half["chunks"]["on_tissue"] < full["chunks"]["on_tissue"]
    table = pd.read_parquet(half["outputs"]["nuclei"])
    assert table["centroid_x_px"].max() < 500 + 32 and 0.35 * full["nuclei"] < len(table) < 0.65 * full["nuclei"]


def test_plain_tiles_at_another_resolution_and_the_models_mpp(tmp_path: Path, tile: np.ndarray) -> None:
    import cv2

    from nucleiseg.infer import ModelLoadError, load_predictor, predict_file
    from nucleiseg.io import write_image
    from nucleiseg.labels import read_label

    predictor = dark_predictor()
    write_image(tmp_path / "t40.png", tile)
    write_image(tmp_path / "t20.png", cv2.resize(tile, (500, 450), interpolation=cv2.INTER_AREA))
    r40 = predict_file(predictor, tmp_path / "t40.png", tmp_path / "out")
    assert predict_file(predictor, tmp_path / "t40.png", tmp_path / "same", mpp=0.251).nuclei == r40.nuclei
    r20 = predict_file(predictor, tmp_path / "t20.png", tmp_path / "out", mpp=0.5)
    assert read_label(r20.outputs["label"]).shape == (450, 500)  # outputs in the tile's own pixels
    assert abs(r20.nuclei - r40.nuclei) < 0.2 * r40.nuclei
    table = pd.read_csv(r20.outputs["nuclei"])
    assert (table["um_per_px"] == 0.5).all()

    from nucleiseg.models import create_model

    kwargs = {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = create_model("resunet34", encoder=kwargs["encoder"], encoder_weights="none").state_dict()
    base = {"model_name": "resunet34", "model_kwargs": kwargs, "state_dict": state, "norm_mean": [0.5] * 3,
            "norm_std": [0.2] * 3}  # fmt: skip
    torch.save(base, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"old\.pt.*no mpp recorded.*assuming 0\.25"):
        assert load_predictor(tmp_path / "old.pt", device="cpu").mpp == 0.25
    torch.save({**base, "mpp": 0.5}, tmp_path / "m20.pt")
    assert load_predictor(tmp_path / "m20.pt", device="cpu").mpp == 0.5
    torch.save({**base, "mpp": -1}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match=r"bad\.pt.*mpp must be a positive number"):
        load_predictor(tmp_path / "bad.pt", device="cpu")


# --- the command line, with a small trained-format checkpoint ---------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tile: np.ndarray) -> dict[str, Path]:
    from nucleiseg.models import create_model

    root = tmp_path_factory.mktemp("slide_cli")
    torch.manual_seed(0)
    kwargs = {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resunet34", encoder=kwargs["encoder"], encoder_weights="none")
    checkpoint = {"model_name": "resunet34", "model_kwargs": kwargs, "state_dict": model.state_dict(),
                  "norm_mean": [0.7, 0.5, 0.7], "norm_std": [0.15, 0.2, 0.15], "mpp": 0.25}  # fmt: skip
    torch.save(checkpoint, root / "model.pt")
    (root / "params.yaml").write_text(
        "infer: {tile: 128, overlap: 32, batch_size: 4, tta: false}\npost: {min_area: 10, radius: 1}\n"
        "slide: {chunk: 250, margin_um: 20.0}\nspatial: {r_steps: 5, simulations: 2, permutations: 3}\n"
    )
    write_slide(root / "slide.tif", tile[:700, :800], 0.25)
    write_slide(root / "nompp.tif", tile[:300, :300], None)
    (root / "broken.svs").write_bytes(b"II*\x00" + os.urandom(2000))
    return {"root": root, "model": root / "model.pt", "params": root / "params.yaml", "slide": root / "slide.tif"}


def run_slide(ws: dict[str, Path], out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        __import__("nucleiseg.cli", fromlist=["app"]).app,
        ["slide", *args, "--out", str(out), "--model", str(ws["model"]), "--params", str(ws["params"]),
         "--device", "cpu"],
    )  # fmt: skip
    return result.exit_code, result.output


def test_cli_refuses_unknown_resolution_and_a_corrupt_slide_fails_alone(workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    code, output = run_slide(
        workspace, root / "o1", str(root / "nompp.tif"), str(root / "broken.svs"), str(workspace["slide"])
    )
    assert code == 1, output
    assert "nompp.tif: the resolution (microns per pixel) is not in the slide's metadata; give it with --mpp" in output
    assert "broken.svs: not a readable slide" in output
    assert (root / "o1" / "slide_summary.json").is_file() and not (root / "o1" / "nompp_summary.json").exists()
    (root / "o2").mkdir()
    (root / "o2" / "nompp_summary.json").write_text("{}")  # a file nucleiseg did not write
    code, output = run_slide(workspace, root / "o2", str(root / "nompp.tif"), "--mpp", "0.25")
    assert code == 1 and "--force" in output
    code, output = run_slide(workspace, root / "o2", str(root / "nompp.tif"), "--mpp", "0.25", "--force")
    assert code == 0, output
    assert json.loads((root / "o2" / "nompp_summary.json").read_text())["mpp_source"] == "--mpp"


KILLED_RUN = """
import sys, time
sys.path.insert(0, sys.argv[3])
from test_slide import SPATIAL, dark_predictor
from nucleiseg.streaming import SlideSettings, segment_slide
# A pause after each committed chunk, so that the test can kill the run between two of them.
segment_slide(sys.argv[1], dark_predictor(), sys.argv[2], settings=SlideSettings(chunk=150, margin_um=20.0),
              spatial=SPATIAL, on_chunk=lambda result: time.sleep(0.3))
"""


def test_a_run_killed_mid_slide_resumes_and_ends_with_the_same_outputs(tmp_path: Path, tile: np.ndarray) -> None:
    path = write_slide(tmp_path / "slide.tif", tile[:700, :800], 0.25)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLED_RUN, str(path), str(killed), str(REPO / "tests")]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = killed / ".slide.chunks"
    deadline = time.monotonic() + 120
    while len(list(work.glob("*.parquet"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no clean-up of any kind: as a machine going down
    process.wait()
    done = len(list(work.glob("*.parquet")))
    assert 3 <= done < 16, process.stderr.read().decode()[-2000:]  # killed mid-slide: 4 x 4 chunks in all
    assert not (killed / "slide_summary.json").exists()

    settings = SlideSettings(chunk=150, margin_um=20.0)
    resumed = segment_slide(path, dark_predictor(), killed, settings=settings, spatial=SPATIAL)
    assert resumed["chunks"] == {"total": 16, "on_tissue": 16, "computed": 16 - done, "reused": done}
    uninterrupted = segment_slide(path, dark_predictor(), whole, settings=settings, spatial=SPATIAL)
    assert uninterrupted["chunks"]["reused"] == 0 and uninterrupted["nuclei"] == resumed["nuclei"] > 50
    pd.testing.assert_frame_equal(
        pd.read_parquet(killed / "slide_nuclei.parquet"), pd.read_parquet(whole / "slide_nuclei.parquet")
    )
    with gzip.open(killed / "slide.geojson.gz", "rt") as a, gzip.open(whole / "slide.geojson.gz", "rt") as b:
        assert json.load(a) == json.load(b)
    assert not work.exists()
    again = segment_slide(path, dark_predictor(), whole, settings=settings, spatial=SPATIAL)  # already finished
    assert again["reused_outputs"] and again["nuclei"] == uninterrupted["nuclei"]


def test_a_slide_made_of_a_real_consep_tile_gives_the_tile_paths_nuclei(tmp_path: Path, consep_dir: Path) -> None:
    from nucleiseg.export import nucleus_polygons
    from nucleiseg.io import read_image

    image = read_image(consep_dir / "train_1.png")
    predictor = dark_predictor()
    rings = {(i % 3, tuple(map(tuple, r.tolist()))) for i, r in nucleus_polygons(predictor.label(image)).items()}
    path = write_slide(tmp_path / "train_1.tif", image, 0.25)
    summary = segment_slide(path, predictor, tmp_path / "out", settings=SlideSettings(chunk=300), spatial=SPATIAL)
    assert summary["chunks"]["on_tissue"] == 9 and summary["clipped"] == 0
    assert slide_features(summary) == rings and len(rings) > 100
