"""Tiled prediction, TTA, memory bound, model loading (checkpoint and MLflow), and predict_files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nucleiseg.infer import (
    InferSettings,
    ModelLoadError,
    PostSettings,
    axis_tiles,
    expand_inputs,
    load_predictor,
    predict_classes,
    predict_files,
    predict_label,
    predict_probabilities,
    reflect_indices,
)

MEAN = (0.7, 0.5, 0.7)
STD = (0.15, 0.2, 0.15)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_net(seed: int = 0, layers: int = 3, symmetric: bool = False) -> nn.Module:
    """A translation-equivariant toy net: ``layers`` 3x3 convs (receptive radius ``layers``), zero padding.

    ``symmetric``: every kernel is invariant under the 8 symmetries of the square, so the net commutes with
    flips and 90-degree rotations.
    """
    torch.manual_seed(seed)
    channels = [*[3, 8, 8, 8][:layers], 5]
    mods: list[nn.Module] = []
    for i in range(layers):
        conv = nn.Conv2d(channels[i], channels[i + 1], 3, padding=1)
        if symmetric:
            with torch.no_grad():
                w = conv.weight
                sym = sum(torch.rot90(w, k, (2, 3)) + torch.rot90(w.flip(3), k, (2, 3)) for k in range(4)) / 8
                conv.weight.copy_(sym)
        mods.append(conv)
        if i < layers - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).eval()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def whole_image_probabilities(model: nn.Module, image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """The model on the whole image, reflect-padded at the bottom/right to the tiling's extent, no tiles."""
    h, w = image.shape[:2]
    hp = axis_tiles(h, tile, overlap)[-1].start + tile
    wp = axis_tiles(w, tile, overlap)[-1].start + tile
    padded = image[reflect_indices(np.arange(hp), h)][:, reflect_indices(np.arange(wp), w)]
    x = (torch.from_numpy(padded).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x[None]), 1)[0, :, :h, :w].numpy()


# ----------------------------------------------------------------------------------------------------------
# Tiling geometry
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tile", "overlap"), [(224, 80), (64, 16), (32, 0), (64, 63)])
def test_axis_tiles_partition_the_axis_and_keep_tile_centres(tile, overlap):
    for length in [1, 5, tile - 1, tile, tile + 1, 2 * tile + 7, 1000, 1088]:
        tiles = axis_tiles(length, tile, overlap)
        # The reference's count: ceil((L - tile) / stride) + 1 tiles when L > tile, else one.
        stride = tile - overlap
        expected = 1 if length <= tile else -(-(length - tile) // stride) + 1
        assert len(tiles) == expected
        covered = np.zeros(length, dtype=int)
        for k, t in enumerate(tiles):
            assert t.start <= t.keep_start < t.keep_stop <= t.start + tile
            covered[t.keep_start : t.keep_stop] += 1
            if k > 0:  # inner sides drop overlap // 2 (leading) and the rest (trailing)
                assert t.keep_start - t.start == overlap // 2
            if k < len(tiles) - 1:
                assert t.start + tile - t.keep_stop == overlap - overlap // 2
        assert np.all(covered == 1), "every pixel comes from exactly one tile"
        assert tiles[-1].start + tile >= length


def test_reflect_indices_match_numpy_pad():
    for length in [1, 2, 3, 10]:
        idx = np.arange(-25, length + 25)
        ref = np.pad(np.arange(length), 25, mode="reflect") if length > 1 else np.zeros(length + 50, int)
        assert np.array_equal(reflect_indices(idx, length), ref)


def test_bad_tiling_arguments_are_rejected():
    model, image = conv_net(), rgb(40, 40)
    with pytest.raises(ValueError, match="overlap"):
        predict_probabilities(model, image, MEAN, STD, tile=32, overlap=32)
    with pytest.raises(ValueError, match="0-255"):
        predict_probabilities(model, image, (180.0, 128.0, 180.0), (40.0, 50.0, 40.0), tile=32, overlap=8)
    with pytest.raises(ValueError, match="RGB uint8"):
        predict_probabilities(model, image.astype(np.float32), MEAN, STD, tile=32, overlap=8)


# ----------------------------------------------------------------------------------------------------------
# Tiled prediction
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tile", "overlap"), [((100, 150), 64, 16), ((300, 301), 64, 24), ((57, 33), 64, 16)])
def test_tiled_prediction_equals_whole_image_prediction(size, tile, overlap):
    """A translation-equivariant net with receptive radius 3 < overlap // 2: stitching the tile centres
    must reproduce the whole-image output everywhere, borders included."""
    model = conv_net()
    image = rgb(*size)
    tiled = predict_probabilities(model, image, MEAN, STD, tile=tile, overlap=overlap, batch_size=3)
    assert tiled.shape == (5, *size) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole_image_probabilities(model, image, tile, overlap), atol=2e-5)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)


def test_tiled_prediction_with_the_paper_tiling_equals_whole_image():
    model = conv_net(layers=2)
    image = rgb(250, 300, seed=1)
    tiled = predict_probabilities(model, image, MEAN, STD, tile=224, overlap=80, batch_size=8)
    np.testing.assert_allclose(tiled, whole_image_probabilities(model, image, 224, 80), atol=2e-5)


def test_tile_borders_would_show_without_the_central_crop():
    """Guard for the test above: the toy net's output does depend on context, so keeping tile edges
    (overlap 0: no margin) differs from the whole image near the seams."""
    model = conv_net()
    image = rgb(100, 100, seed=2)
    seams = predict_probabilities(model, image, MEAN, STD, tile=32, overlap=0)
    whole = whole_image_probabilities(model, image, 32, 0)
    assert np.abs(seams - whole).max() > 1e-3


def test_batch_size_does_not_change_the_result():
    model, image = conv_net(), rgb(130, 170, seed=3)
    a = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, batch_size=1)
    b = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, batch_size=7)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_classes_are_the_argmax_of_the_probabilities_and_float16_output():
    model, image = conv_net(seed=4), rgb(120, 90, seed=4)
    probs = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16)
    classes = predict_classes(model, image, MEAN, STD, tile=64, overlap=16)
    assert classes.dtype == np.uint8 and classes.shape == image.shape[:2]
    assert np.array_equal(classes, probs.argmax(0))
    assert len(np.unique(classes)) > 1
    half = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, probs, atol=1e-3)


def test_model_mode_is_restored_and_wrong_outputs_are_reported():
    model = conv_net()
    model.train()
    predict_classes(model, rgb(40, 40), MEAN, STD, tile=32, overlap=8)
    assert model.training
    bad = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="expected"):
        predict_classes(bad, rgb(40, 40), MEAN, STD, tile=32, overlap=8)


# ----------------------------------------------------------------------------------------------------------
# TTA
# ----------------------------------------------------------------------------------------------------------


def test_tta_with_a_symmetric_model_equals_no_tta():
    model = conv_net(seed=5, symmetric=True)
    image = rgb(150, 130, seed=5)
    plain = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16)
    tta = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, tta=True)
    np.testing.assert_allclose(tta, plain, atol=2e-5)


def test_tta_averages_the_eight_symmetries_in_probability_space():
    """On one tile, TTA = mean over the 8 flips/rotations of the back-transformed softmax."""
    model = conv_net(seed=6)
    image = rgb(64, 64, seed=6)
    got = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, tta=True)
    expected = np.zeros_like(got)
    for flip in (False, True):
        for k in range(4):
            view = image[:, ::-1] if flip else image
            view = np.ascontiguousarray(np.rot90(view, k, axes=(0, 1)))
            p = whole_image_probabilities(model, view, 64, 16)
            p = np.rot90(p, -k, axes=(1, 2))
            expected += p[:, :, ::-1] if flip else p
    expected /= 8
    np.testing.assert_allclose(got, expected, atol=2e-5)
    plain = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16)
    assert np.abs(plain - got).max() > 1e-3  # the toy net is not symmetric: TTA changed something


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch
    from torch import nn
    from nucleiseg.infer import predict_label
    torch.set_num_threads(1)

    def blobs(side):
        # Dark 8x8-pixel blocks ("nuclei", ~30% of the area) on a bright background.
        rng = np.random.default_rng(side)
        dark = np.repeat(np.repeat(rng.random((side // 8, side // 8)) < 0.3, 8, 0), 8, 1)
        return np.where(dark[..., None], 60, 220).astype(np.uint8) + rng.integers(0, 20, (side, side, 3), np.uint8)

    # A 1x1-conv "network" that calls dark pixels inside tumor / lymphocyte / stroma by their colour.
    model = nn.Conv2d(3, 5, 1).eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[0, :, 0, 0] = 1.0
        model.weight[1:4, :, 0, 0] = -torch.eye(3) * torch.tensor([1.0, 1.05, 1.1])[:, None]
    images = {side: blobs(side) for side in map(int, sys.argv[1:])}
    predict_label(model, images[min(images)][:256, :256], (0.5,) * 3, (0.25,) * 3)  # imports, warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for side, image in sorted(images.items()):  # ru_maxrss only grows: smaller first
        label = predict_label(model, image, (0.5,) * 3, (0.25,) * 3, tile=224, overlap=80, batch_size=8)
        out[side] = {"kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, "nuclei": int(label.max())}
        del label
    print(json.dumps(out))
    """
)


def test_memory_per_pixel_keeps_a_10000_square_image_under_4_gib():
    """Peak RSS growth of predict_label (tiles + post-processing) at two image sizes: the slope is the memory
    per pixel, the intercept the fixed part (allocator pools, one strip of tiles).

    A 10000x10000 image must fit in 4 GiB with its 300 MB RGB array. (benchmarks/bench_inference.py --memory
    runs the 10000x10000 case itself.)
    """
    small, large = 600, 1800
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(small), str(large)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert result[large]["nuclei"] > 3000  # max id: thousands of nuclei of each class, a real post-processing load
    grow = (result[large]["kib"] - result[small]["kib"]) * 1024
    per_pixel = grow / (large**2 - small**2)
    fixed = max(0.0, result[small]["kib"] * 1024 - per_pixel * small**2)
    projected = per_pixel * 1e8 + fixed + 3e8
    assert projected < 4 * 2**30, f"{per_pixel:.1f} B/pixel + {fixed / 2**20:.0f} MiB -> {projected / 2**30:.2f} GiB"
    # The float32 probability maps alone would be 20 B/pixel: the bounded path must stay well below.
    assert per_pixel < 16, f"{per_pixel:.1f} B/pixel"


# ----------------------------------------------------------------------------------------------------------
# Loading a trained model
# ----------------------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0):
    from nucleiseg.models import create_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("resunet34", encoder="mobilenetv3_small_050", encoder_weights="none").eval()


def write_checkpoint(path, model, **extra):
    payload = {
        "model_name": "resunet34",
        "model_kwargs": {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1},
        "state_dict": model.state_dict(),
        "norm_mean": list(MEAN),
        "norm_std": list(STD),
        "stain": None,
        # as the trainer writes them: a params dump, with batch-orchestration keys the predictor ignores
        "infer": {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False, "runner": "threads", "workers": 2},
        "post": {"min_area": 5, "radius": 1},
        "epoch": 3,
    }
    payload.update(extra)
    torch.save(payload, path)
    return path


def test_load_predictor_from_checkpoint_reproduces_the_model(tmp_path):
    from nucleiseg.stain import fit_normalizer

    model = tiny_model()
    image = rgb(96, 80, seed=7)
    reference = np.random.default_rng(8).integers(60, 200, (64, 64, 3), dtype=np.uint8)
    stain = fit_normalizer(reference, "reinhard")
    ckpt = write_checkpoint(tmp_path / "best.pt", model, stain=stain.to_dict())
    predictor = load_predictor(ckpt, device="cpu")
    assert predictor.infer == InferSettings(tile=64, overlap=16, batch_size=4, tta=False)
    assert predictor.post == PostSettings(min_area=5, radius=1)
    assert predictor.info["epoch"] == 3 and predictor.stain is not None
    expected = predict_probabilities(model, stain.transform(image), MEAN, STD, tile=64, overlap=16)
    np.testing.assert_allclose(predictor.probabilities(image), expected, atol=1e-5)
    label = predictor.label(image)
    assert label.shape == image.shape[:2] and label.dtype == np.int32


def test_load_predictor_errors_name_the_reference(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_predictor(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"corrupt\.pt: not a readable checkpoint"):
        load_predictor(corrupt)
    torch.save({"model_name": "resunet34", "state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(ModelLoadError, match=r"partial\.pt: checkpoint lacks model_kwargs, norm_mean, norm_std"):
        load_predictor(tmp_path / "partial.pt")
    ckpt = write_checkpoint(tmp_path / "wrong.pt", tiny_model(), norm_mean=[180, 120, 180])
    with pytest.raises(ModelLoadError, match="0-255"):
        load_predictor(ckpt)
    ckpt = write_checkpoint(tmp_path / "keys.pt", tiny_model(), post={"min_area": "many"})
    with pytest.raises(ModelLoadError, match=r"keys\.pt.*min_area must be an integer"):
        load_predictor(ckpt)


@pytest.mark.slow
def test_load_predictor_from_the_mlflow_registry(tmp_path, monkeypatch):
    """Real MLflow (SQLite store): log the model with its metadata, register it, alias it, and load
    ``models:/name@alias``."""
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient

    from nucleiseg import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(uri, "test-infer", tmp_path / "artifacts")
    model = tiny_model(seed=1)
    metadata = {
        "model_kwargs": {"name": "resunet34", "encoder": "mobilenetv3_small_050"},
        "norm_mean": list(MEAN),
        "norm_std": list(STD),
        "stain": None,
        "infer": {"tile": 64, "overlap": 16, "batch_size": 2, "tta": False},
        "post": {"min_area": 5, "radius": 1},
    }
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="model", metadata=metadata, serialization_format="pickle", pip_requirements=["torch"]
        )
    version = mlflow.register_model(info.model_uri, "nucleiseg-test")
    MlflowClient().set_registered_model_alias("nucleiseg-test", "champion", version.version)
    try:
        predictor = load_predictor("models:/nucleiseg-test@champion", device="cpu")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert predictor.infer.batch_size == 2 and predictor.post.min_area == 5
    image = rgb(70, 90, seed=9)
    expected = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16)
    np.testing.assert_allclose(predictor.probabilities(image), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def test_predict_files_skips_bad_inputs_and_finishes_the_others(tmp_path):
    from nucleiseg.io import write_image

    ckpt = write_checkpoint(tmp_path / "m.pt", tiny_model())
    predictor = load_predictor(ckpt, device="cpu")
    src = tmp_path / "in"
    write_image(src / "a.png", rgb(70, 64, seed=1))
    write_image(src / "b.png", rgb(64, 100, seed=2))
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    other = tmp_path / "other"
    write_image(other / "a.png", rgb(64, 64, seed=3))  # same name as in/a.png
    (tmp_path / "empty").mkdir()
    files, problems = expand_inputs([src, other / "a.png", tmp_path / "nope.png", tmp_path / "empty"])
    assert [p.name for p in files] == ["a.png", "b.png", "c.png", "a.png"]
    assert [r.input for r in problems] == [str(tmp_path / "nope.png"), str(tmp_path / "empty")]
    assert "no such file" in problems[0].error and "no images" in problems[1].error
    seen = []
    results = predict_files(predictor, files, tmp_path / "out", on_result=seen.append)
    assert seen == results
    status = {(r.input, r.status) for r in results}
    assert (str(src / "a.png"), "ok") in status and (str(src / "b.png"), "ok") in status
    failed = {r.input: r.error for r in results if r.status == "failed"}
    assert "c.png" in failed[str(src / "c.png")] and "ImageReadError" in failed[str(src / "c.png")]
    assert "already used" in failed[str(other / "a.png")]
    for name in ("a", "b"):
        for suffix in ("_label.png", "_overlay.png", ".geojson", "_nuclei.csv"):
            assert (tmp_path / "out" / f"{name}{suffix}").is_file()
    assert not list((tmp_path / "out").glob("c*"))
    ok = next(r for r in results if r.name == "a" and r.status == "ok")
    assert ok.nuclei == ok.tumor + ok.lymphocyte + ok.stroma and (ok.height, ok.width) == (70, 64)


def test_predict_label_matches_classes_then_postprocess():
    from nucleiseg.postprocess import postprocess

    model, image = conv_net(seed=10), rgb(90, 110, seed=10)
    classes = predict_classes(model, image, MEAN, STD, tile=64, overlap=16)
    label = predict_label(model, image, MEAN, STD, tile=64, overlap=16, min_area=3, radius=1)
    assert np.array_equal(label, postprocess(classes, min_area=3, radius=1))


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def test_predict_command_end_to_end_with_a_corrupt_image(tmp_path):
    from typer.testing import CliRunner

    from nucleiseg.cli import app
    from nucleiseg.io import write_image

    ckpt = write_checkpoint(tmp_path / "model.pt", tiny_model(seed=2))
    src = tmp_path / "images"
    write_image(src / "good_1.png", rgb(80, 72, seed=11))
    write_image(src / "good_2.png", rgb(64, 96, seed=12))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not really a png")
    params = tmp_path / "params.yaml"
    params.write_text("infer:\n  tile: 64\n  overlap: 16\n  batch_size: 4\npost:\n  min_area: 5\n  radius: 1\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["predict", str(ckpt), str(src), "--out", str(out), "--params", str(params), "--set", "post.radius=2"],
    )
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output
    for name in ("good_1", "good_2"):
        for suffix in ("_label.png", "_overlay.png", ".geojson", "_nuclei.csv"):
            assert (out / f"{name}{suffix}").is_file()
        geo = json.loads((out / f"{name}.geojson").read_text())
        assert geo["type"] == "FeatureCollection"
    assert not list(out.glob("broken*"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["ok"], summary["failed"]) == (3, 2, 1)
    assert summary["infer"] == {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False}
    assert summary["post"] == {**PostSettings().__dict__, "min_area": 5, "radius": 2}
    by_input = {r["input"]: r for r in summary["results"]}
    assert by_input[str(src / "broken.png")]["status"] == "failed"
    assert "broken.png" in by_input[str(src / "broken.png")]["error"]
    assert by_input[str(src / "good_1.png")]["status"] == "ok"
    assert by_input[str(src / "good_1.png")]["outputs"]["label"] == str(out / "good_1_label.png")

    # All good: exit 0, and --tta overrides the params.
    result = CliRunner().invoke(
        app, ["predict", str(ckpt), str(src / "good_2.png"), "-o", str(out / "tta"), "--params", str(params), "--tta"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tta" / "summary.json").read_text())["infer"]["tta"] is True


def test_score_command_takes_tiling_from_params_not_the_checkpoint(tmp_path):
    """The evaluate stage declares infer and post as params: changing them must change how it scores."""
    from typer.testing import CliRunner

    from nucleiseg.cli import app
    from nucleiseg.infer import InferSettings, PostSettings, load_predictor
    from nucleiseg.io import write_image
    from nucleiseg.labels import write_label

    ckpt = write_checkpoint(tmp_path / "model.pt", tiny_model(seed=3))  # saved with tile 64, overlap 16
    data = tmp_path / "data"
    label = np.zeros((96, 80), np.uint16)
    label[10:20, 10:22], label[40:52, 30:40] = 3, 4
    write_image(data / "tile_a.png", rgb(96, 80, seed=5))
    write_label(data / "tile_a_label.png", label)
    splits = tmp_path / "splits.json"
    splits.write_text('{"train": [], "val": [], "test": ["tile_a"]}')
    out = tmp_path / "reports" / "metrics.json"
    (tmp_path / "params.yaml").write_text("{}\n")
    result = CliRunner().invoke(
        app,
        ["score", str(ckpt), "--params", str(tmp_path / "params.yaml"), "--splits", str(splits),
         "--data-dir", str(data), "--out", str(out), "--set", "infer.tile=32", "--set", "infer.overlap=8",
         "--set", "post.min_area=3", "--set", "train.device=cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["infer"] == {"tile": 32, "overlap": 8, "batch_size": 8, "tta": False}
    assert report["post"] == {**PostSettings().__dict__, "min_area": 3, "radius": 1}
    # the figures are those of the model predicting with that tiling
    predictor = load_predictor(ckpt, device="cpu")
    predictor.infer, predictor.post = InferSettings(32, 8, 8, False), PostSettings(3, 1)
    from nucleiseg.evaluation import evaluate_model, split_items

    expected = evaluate_model(predictor, split_items(data, splits, "test"))["summary"]
    assert report["summary"]["all"]["tp"] == expected["all"]["tp"]
    assert report["summary"]["all"]["fp"] == expected["all"]["fp"]


def test_score_command_writes_the_figures_of_eval_protocol(tmp_path):
    """eval.protocol (default both) decides the sections of the report and of the headline; --protocol overrides."""
    from typer.testing import CliRunner

    from nucleiseg.cli import app
    from nucleiseg.io import write_image
    from nucleiseg.labels import write_label
    from nucleiseg.metrics import HOVERNET_IMAGE_FIGURES, HOVERNET_POOLED_FIGURES, HOVERNET_TYPES

    ckpt = write_checkpoint(tmp_path / "model.pt", tiny_model(seed=3))
    data = tmp_path / "data"
    label, other = np.zeros((96, 80), np.uint16), np.zeros((96, 80), np.uint16)
    label[10:20, 10:22], label[40:52, 30:40], other[70:80, 50:60] = 3, 4, 1
    write_image(data / "tile_a.png", rgb(96, 80, seed=5))
    write_label(data / "tile_a_label.png", label)
    write_label(data / "tile_a_other.png", other)
    splits = tmp_path / "splits.json"
    splits.write_text('{"train": [], "val": [], "test": ["tile_a"]}')
    (tmp_path / "params.yaml").write_text("{}\n")
    out = tmp_path / "reports" / "metrics.json"
    args = ["score", str(ckpt), "--params", str(tmp_path / "params.yaml"), "--splits", str(splits),
            "--data-dir", str(data), "--out", str(out), "--set", "train.device=cpu"]  # fmt: skip

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report, summary = json.loads(out.read_text()), json.loads((out.parent / "metrics_summary.json").read_text())
    assert report["protocol"] == "both" and {"images", "summary", "hovernet"} <= set(report)
    assert report["hovernet"]["images"]["tile_a"]["n_other"] == 1 and report["hovernet"]["mean"]["n_true"] == 3
    assert {"all", "classification", "mpq_plus", "n_images"} <= set(summary)  # the paper's keys are kept
    assert set(summary["hovernet"]) == {*HOVERNET_IMAGE_FIGURES, *HOVERNET_POOLED_FIGURES}
    assert summary["hovernet"]["f1_d"] == report["hovernet"]["pooled"]["f1_d"]

    result = CliRunner().invoke(app, [*args, "--protocol", "hovernet"])
    assert result.exit_code == 0, result.output
    report, summary = json.loads(out.read_text()), json.loads((out.parent / "metrics_summary.json").read_text())
    assert set(report) >= {"protocol", "hovernet"} and "summary" not in report and "all" not in summary
    assert set(summary) == {"hovernet", "n_images"}
    rows = json.loads((out.parent / "confusion.json").read_text())  # the centroid pairs, by HoVer-Net type
    assert len(rows) == report["hovernet"]["pooled"]["tp_d"]
    assert all(row["actual"] in HOVERNET_TYPES for row in rows)
    result = CliRunner().invoke(app, [*args, "--set", "eval.protocol=kumar"])
    assert result.exit_code == 2 and "protocol" in result.output


def test_predict_command_reports_a_bad_model(tmp_path):
    from typer.testing import CliRunner

    from nucleiseg.cli import app

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    image = tmp_path / "a.png"
    from nucleiseg.io import write_image

    write_image(image, rgb(40, 40))
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(
        app, ["predict", str(bad), str(image), "--out", str(tmp_path / "o"), "--params", str(params)]
    )
    assert result.exit_code == 1
    assert "bad.pt: not a readable checkpoint" in result.output


def test_stain_normalisation_streams_with_the_strips_as_on_the_whole_image(tmp_path) -> None:
    """A model's stain step runs strip by strip inside the tiling (no normalised copy of the image), with the
    pixels of the whole-image normalisation: the same classes as predicting on the normalised image."""
    from conftest import write_tiny_checkpoint

    from nucleiseg.infer import load_predictor, predict_classes
    from nucleiseg.stain import fit_normalizer
    from nucleiseg.synth import synth_tile

    checkpoint = write_tiny_checkpoint(tmp_path / "model.pt")
    state = torch.load(checkpoint, weights_only=True)
    state["stain"] = fit_normalizer(synth_tile(1, 128)[0], "macenko").to_dict()
    torch.save(state, checkpoint)
    predictor = load_predictor(checkpoint, device="cpu")
    image = synth_tile(2, (200, 150))[0]
    normalised = predictor.prepare(image)
    assert np.abs(normalised.astype(int) - predictor.stain.transform(image).astype(int)).max() <= 1
    s = predictor.infer
    want = predict_classes(predictor.model, normalised, predictor.mean, predictor.std, s.tile, s.overlap, device="cpu")
    np.testing.assert_array_equal(predictor.classes(image), want)
