"""ONNX export (``nucleiseg export onnx``) and ONNX Runtime as an inference backend, on a tiny trained network.

Tolerances, for float32 networks whose convolutions ONNX Runtime sums in another order than torch: logits within
1e-5 of the logits' range, probabilities within 1e-5; the nuclei label of both backends identical (the argmax flips
only where two maps tie to within 1e-6, which a trained network's confident maps do not do here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_INFER, TINY_MODEL_KWARGS
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.infer import ModelLoadError, load_predictor, model_identity
from nucleiseg.onnx_model import OPSET, OnnxNetwork, check_against_torch
from nucleiseg.synth import synth_tile

LOGIT_TOLERANCE = 1e-5  # relative to max |logit|
PROBABILITY_TOLERANCE = 1e-5
CHECK_SIZES = "224,256,320x480,1024"
MEAN, STD = [0.7, 0.5, 0.7], [0.15, 0.2, 0.15]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's tiny network (ResUNet, MobileNetV3-small-0.5 encoder) trained 40 steps on 4 synthetic
    128x128 tiles: confident maps with real nuclei, unlike random weights, in a few seconds."""
    from nucleiseg.labels import targets
    from nucleiseg.models import create_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights offline: expected
        kwargs = {k: v for k, v in TINY_MODEL_KWARGS.items() if k != "name"}
        model = create_model("resunet34", encoder_weights="none", **kwargs)
    tiles = [synth_tile(seed, 128) for seed in range(4)]
    mean, std = np.float32(MEAN), np.float32(STD)
    x = torch.from_numpy(np.stack([((rgb / 255 - mean) / std).transpose(2, 0, 1) for rgb, _ in tiles])).float()
    y = torch.from_numpy(np.stack([targets(label) for _, label in tiles])).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        pick = torch.randint(0, 4, (4,), generator=generator)
        r, c = (int(v) for v in torch.randint(0, 33, (2,), generator=generator))
        loss = torch.nn.functional.cross_entropy(
            model(x[pick, :, r : r + 96, c : c + 96]), y[pick, r : r + 96, c : c + 96]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "trained.pt"
    torch.save(
        {
            "model_name": "resunet34",
            "model_kwargs": TINY_MODEL_KWARGS,
            "state_dict": model.state_dict(),
            "norm_mean": MEAN,
            "norm_std": STD,
            "stain": None,
            "infer": TINY_INFER,
            "post": {"min_area": 5, "radius": 1},
            "mpp": 0.25,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def exported(trained_checkpoint: Path) -> tuple[Path, str]:
    """``nucleiseg export onnx`` of the trained checkpoint: the file and the command's output."""
    out = trained_checkpoint.parent / "exported" / "model.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", str(trained_checkpoint), str(out), "--sizes", CHECK_SIZES])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_writes_opset_dynamic_axes_and_the_predictors_metadata(exported, trained_checkpoint):
    import onnx

    path, output = exported
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    for value in (*proto.graph.input, *proto.graph.output):
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5
    network = OnnxNetwork(path)
    assert network.metadata["norm_mean"] == pytest.approx(MEAN)
    assert network.metadata["norm_std"] == pytest.approx(STD)
    assert network.metadata["infer"] == TINY_INFER
    assert network.metadata["post"]["min_area"] == 5
    assert network.metadata["mpp"] == 0.25 and network.metadata["input_divisor"] == 32
    assert network.metadata["source"] == str(trained_checkpoint)
    assert f"wrote {path}" in output


def test_export_agrees_with_torch_on_tiles_of_several_sizes(exported, trained_checkpoint):
    path, output = exported
    torch_model = load_predictor(trained_checkpoint, device="cpu").model
    differences = check_against_torch(
        torch_model, OnnxNetwork(path), MEAN, STD, [(224, 224), (256, 256), (320, 480), (1024, 1024)]
    )
    for d in differences:
        assert d.logits_range > 1  # a trained network's logits, not the near-zero ones of random weights
        assert d.logits <= LOGIT_TOLERANCE * d.logits_range, d
        assert d.probabilities <= PROBABILITY_TOLERANCE, d
        # the command printed the same check
        assert f"{d.height}x{d.width}" in output
    assert output.count("e-") >= 2 * len(differences)  # both differences, per tile, in scientific notation


def test_both_backends_give_the_same_label(exported, trained_checkpoint):

    path, _ = exported
    image, _ = synth_tile(11, (200, 300))  # several 64/16 tiles, and a ragged edge on both axes
    by_torch = load_predictor(trained_checkpoint, device="cpu")
    from_file = load_predictor(path, device="cpu")  # an exported file: run by ONNX Runtime whatever the backend
    on_load = load_predictor(trained_checkpoint, device="cpu", backend="onnxruntime")  # exported in memory
    assert (by_torch.backend, from_file.backend, on_load.backend) == ("torch", "onnxruntime", "onnxruntime")
    assert from_file.mean == by_torch.mean and from_file.infer == by_torch.infer and from_file.post == by_torch.post
    expected = by_torch.label(image)
    assert len(np.unique(expected)) > 10  # the trained network finds nuclei
    for predictor in (from_file, on_load):
        np.testing.assert_array_equal(predictor.label(image), expected)
    # TTA and the probability-based post-processing run after the logits too: shared by both backends.
    from nucleiseg.infer import PostSettings

    watershed = PostSettings(min_area=5, method="watershed", classify="probability")
    np.testing.assert_array_equal(
        on_load.label(image, post=watershed, tta=True), by_torch.label(image, post=watershed, tta=True)
    )
    probs_t, probs_o = by_torch.probabilities(image), from_file.probabilities(image)
    assert float(np.abs(probs_t - probs_o).max()) <= PROBABILITY_TOLERANCE
    # Outputs of an exported network are not reused as the torch model's (resume, batch skips).
    assert model_identity(on_load) != model_identity(by_torch)
    assert model_identity(from_file).startswith("sha256:")


def test_bad_onnx_inputs_are_refused_by_name(tmp_path, trained_checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", str(trained_checkpoint), str(tmp_path / "model.bin")])
    assert result.exit_code == 2 and "must be an .onnx file" in result.output
    result = runner.invoke(app, ["export", "onnx", str(trained_checkpoint), str(tmp_path / "m.onnx"), "--sizes", "100"])
    assert result.exit_code == 2 and "100x100" in result.output and "multiples of 32" in result.output
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"user data")
    result = runner.invoke(app, ["export", "onnx", str(trained_checkpoint), str(mine)])
    assert result.exit_code == 1 and "--force" in result.output
    assert mine.read_bytes() == b"user data"  # refused before any work

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(ModelLoadError, match=r"corrupt\.onnx"):
        load_predictor(corrupt, device="cpu")
    import onnx
    from onnx import TensorProto, helper

    bare = tmp_path / "bare.onnx"  # a valid ONNX model (an identity) without nucleiseg's metadata
    shape = ["batch", 3, "height", "width"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])],
        "bare",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), bare)
    with pytest.raises(ModelLoadError, match=r"bare\.onnx: no nucleiseg metadata"):
        load_predictor(bare, device="cpu")
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime"):
        load_predictor(trained_checkpoint, backend="tensorrt")


def test_params_accept_only_known_backends():
    from nucleiseg.params import ParamsError, load_params

    assert load_params(None, ["infer.backend=onnxruntime"]).infer.backend == "onnxruntime"
    with pytest.raises(ParamsError, match=r"infer\.backend"):
        load_params(None, ["infer.backend=tensorrt"])


def test_predict_runs_an_exported_file_like_its_checkpoint(tmp_path, exported, trained_checkpoint):
    from nucleiseg.io import write_image
    from nucleiseg.labels import read_label

    path, _ = exported
    images = tmp_path / "tiles"
    write_image(images / "tile.png", synth_tile(5, (160, 224))[0])
    runner = CliRunner()
    for model, out in ((trained_checkpoint, "by_torch"), (path, "by_onnx")):
        result = runner.invoke(
            app, ["predict", str(model), str(images), "--out", str(tmp_path / out), "--device", "cpu"]
        )
        assert result.exit_code == 0, result.output
    expected = read_label(tmp_path / "by_torch" / "tile_label.png")
    assert expected.max() > 0
    np.testing.assert_array_equal(read_label(tmp_path / "by_onnx" / "tile_label.png"), expected)


def test_batch_runs_an_exported_file_and_records_the_backend(tmp_path, exported, trained_checkpoint):
    from nucleiseg.io import write_image
    from nucleiseg.labels import read_label
    from nucleiseg.params import load_params
    from pipelines.batch_inference import flow_arguments, run_batch_locally

    path, _ = exported
    images, out = tmp_path / "tiles", tmp_path / "out"
    write_image(images / "tile.png", synth_tile(6, (128, 192))[0])

    def batch(model: Path, *settings: str) -> dict:
        return run_batch_locally(**flow_arguments(load_params(None, list(settings)), images, out, str(model)))

    by_torch = batch(trained_checkpoint)
    assert by_torch["ok"] == 1 and "backend" not in by_torch["settings"]["infer"]  # torch runs: settings as before
    expected = read_label(out / "tile_label.png")
    by_onnx = batch(path)  # another model identity: computed again, by ONNX Runtime
    assert by_onnx["ok"] == 1 and by_onnx["settings"]["infer"]["backend"] == "onnxruntime"
    np.testing.assert_array_equal(read_label(out / "tile_label.png"), expected)
    again = batch(path, "infer.backend=onnxruntime")  # the setting reaches the flow; same model and backend: reused
    assert again["skipped"] == 1 and again["ok"] == 0
