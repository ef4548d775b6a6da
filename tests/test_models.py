"""Models: shapes on the issue's input sizes, the reference architecture, the factory, and weight loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nucleiseg.models import (
    PretrainedWeightsWarning,
    SegmentationModel,
    UNetDecoder,
    WeightsError,
    available_models,
    create_model,
)

SIZES = [(224, 224), (256, 320)]


@pytest.fixture(autouse=True)
def no_weight_caches(tmp_path, monkeypatch):
    """Empty weight caches and offline mode: 'imagenet' must fall back, quickly, unless a test fills a cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def models() -> dict[str, SegmentationModel]:
    torch.manual_seed(0)
    return {name: create_model(name, encoder_weights="none").eval() for name in available_models()}


@pytest.mark.parametrize("name", ["resunet34", "unet", "fcn8s"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_shape(models, name, size):
    with torch.no_grad():
        out = models[name](torch.randn(1, 3, *size))
    assert out.shape == (1, 5, *size)
    assert torch.isfinite(out).all()


def test_training_step_gives_gradients_to_every_parameter():
    model = create_model("resunet34", encoder="resnet18", encoder_weights="none").train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_resunet34_matches_reference_architecture(models):
    """The decoder of the reference ResUNet34: u5..u8 and the final transposed convolution."""
    model = models["resunet34"]
    assert model.encoder.channels == [64, 64, 128, 256, 512]
    assert model.encoder.reductions == [2, 4, 8, 16, 32]
    expected = [  # (up: in, out), (conv1: in, out), conv2 out
        ((512, 256), (512, 256), 256),
        ((256, 128), (256, 128), 128),
        ((128, 64), (128, 64), 64),
        ((64, 32), (96, 64), 64),
    ]
    for block, (up, conv1, conv2) in zip(model.decoder.blocks, expected, strict=True):
        assert (block.up.in_channels, block.up.out_channels) == up
        assert block.up.stride == (2, 2) and block.up.kernel_size == (2, 2)
        assert (block.conv1[0].in_channels, block.conv1[0].out_channels) == conv1
        assert block.conv2[0].out_channels == conv2
        # conv -> ReLU -> BN -> Dropout2d(0.1), the reference's dilated_conv order
        assert [type(m) for m in block.conv1] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Dropout2d]
        assert block.conv1[3].p == pytest.approx(0.1)
    head = model.head.proj
    assert isinstance(head, nn.ConvTranspose2d) and (head.in_channels, head.out_channels) == (64, 5)
    assert head.stride == (2, 2)


def test_unet_matches_reference_channels(models):
    model = models["unet"]
    assert model.encoder.channels == [16, 32, 64, 128, 256]
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [128, 64, 32, 16]
    assert isinstance(model.head.proj, nn.Conv2d) and model.head.proj.kernel_size == (1, 1)
    assert model.divisor == 16


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet_b0"])
def test_other_timm_encoders_work_unchanged(encoder):
    model = create_model("resunet34", encoder=encoder, encoder_weights="none", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128))
    assert out.shape == (2, 3, 96, 128)
    assert model.info["encoder"] == encoder
    # the decoder follows the encoder's pyramid, whatever its channels
    assert model.decoder.blocks[0].up.in_channels == model.encoder.channels[-1]


def test_decoder_handles_any_pyramid():
    decoder = UNetDecoder([8, 16, 24], [1, 2, 8], dropout=0.0)  # a x4 step as well as a x2 one
    feats = [torch.randn(1, 8, 32, 32), torch.randn(1, 16, 16, 16), torch.randn(1, 24, 4, 4)]
    assert decoder(feats).shape == (1, 8, 32, 32)


def test_input_size_not_divisible_is_a_clear_error(models):
    with pytest.raises(ValueError, match="divisible by 32"):
        models["resunet34"](torch.randn(1, 3, 224, 200))


def test_unknown_model_lists_available_names():
    with pytest.raises(ValueError) as err:
        create_model("segformer")
    for name in ("resunet34", "unet", "fcn8s"):
        assert name in str(err.value)
    assert available_models() == ["fcn8s", "resunet34", "unet"]


def test_imagenet_unreachable_falls_back_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model("resunet34", encoder="resnet18", encoder_weights="imagenet")
    ours = [w for w in caught if issubclass(w.category, PretrainedWeightsWarning)]
    assert len(ours) == 1
    assert "random initialisation" in str(ours[0].message)
    assert model.encoder_pretrained is False
    assert model.info["encoder_pretrained"] is False
    assert model.info["encoder_weights"] == "imagenet"
    assert "HF_HUB_OFFLINE" in model.info["encoder_weights_source"]


def test_imagenet_weights_from_the_hugging_face_cache(no_weight_caches):
    """The real 'imagenet' path, fed from a cache laid out as huggingface_hub lays it out (no network)."""
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False)
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    repo = no_weight_caches / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))

    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsWarning)
        model = create_model("resunet34", encoder="resnet18", encoder_weights="imagenet")
    assert model.encoder_pretrained is True
    assert "Hugging Face cache" in model.info["encoder_weights_source"]
    loaded = model.encoder.model.state_dict()
    assert torch.equal(loaded["layer4.1.conv2.weight"], reference.state_dict()["layer4.1.conv2.weight"])


def test_local_checkpoint_is_loaded(tmp_path):
    import timm

    reference = timm.create_model("resnet34", pretrained=False)
    path = tmp_path / "resnet34.pth"
    torch.save(reference.state_dict(), path)

    model = create_model("resunet34", encoder_weights=str(path))
    assert model.encoder_pretrained is True
    assert str(path) in model.info["encoder_weights_source"]
    expected = reference.state_dict()
    for key, value in model.encoder.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_local_checkpoint_wrapped_and_prefixed(tmp_path):
    """A whole nucleiseg model saved as {'state_dict': ...}: its 'encoder.model.' tensors are used."""
    source = create_model("resunet34", encoder="resnet18", encoder_weights="none")
    path = tmp_path / "previous_run.pt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}}, path)
    model = create_model("resunet34", encoder="resnet18", encoder_weights=str(path))
    assert torch.equal(model.encoder.model.conv1.weight, source.encoder.model.conv1.weight)


def test_bad_local_checkpoints_name_the_file(tmp_path):
    import timm

    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=r"nope\.pth"):
        create_model("resunet34", encoder="resnet18", encoder_weights=str(missing))

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match=r"corrupt\.pth"):
        create_model("resunet34", encoder="resnet18", encoder_weights=str(corrupt))

    wrong = tmp_path / "resnet50_for_resnet18.pth"  # same key names, other shapes in places
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"resnet50_for_resnet18\.pth.*does not fit"):
        create_model("resunet34", encoder="resnet18", encoder_weights=str(wrong))


def test_fcn8s_loads_vgg16_checkpoint_with_fc_layers_as_convolutions(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    fc6 = torch.randn(4096, 512 * 7 * 7)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({"classifier.0.weight": fc6, "classifier.0.bias": torch.randn(4096)})
    state.update({"classifier.3.weight": torch.randn(4096, 4096), "classifier.3.bias": torch.randn(4096)})
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)

    model = create_model("fcn8s", encoder_weights=str(path))
    assert model.encoder_pretrained is True
    assert torch.equal(model.encoder.features[28].weight, features[28].weight)
    assert torch.equal(model.encoder.fc6.weight, fc6.view(4096, 512, 7, 7))
