"""Losses against direct computations: eq. 1 by hand, eq. 3 through a plain torchvision VGG16."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from nucleiseg import losses
from nucleiseg.losses import PerceptualLoss, SegmentationLoss, VGG16Features, weighted_cross_entropy
from nucleiseg.weights import PretrainedWeightsWarning


@pytest.fixture(autouse=True)
def no_weight_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """torchvision's VGG16 (random init) saved as a checkpoint (its ``features.*`` tensors, the ones the loss
    uses, keeping the file small), and its features for the naive reference."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    return str(path), vgg.features.eval()


@pytest.fixture(scope="module")
def perceptual(vgg_file):
    """The loss on the saved VGG16, built once."""
    return PerceptualLoss(vgg_file[0])


def naive_perceptual(features: torch.nn.Sequential, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as the reference code computes it: 3-channel maps through VGG16 sliced at the four ReLUs."""
    slices = [features[:4], features[4:9], features[9:16], features[16:23]]
    a, b = pred.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1)
    total = 0.0
    for block in slices:
        a, b = block(a), block(b)
        total = total + ((a - b) ** 2).sum() / a.numel()
    return total / 4


def test_weighted_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    weight = torch.rand(2, 6, 7, generator=g) * 10
    weight[0, 0, :3] = 0  # ignored pixels count in the mean with weight 0
    log_p = torch.log_softmax(logits.double(), dim=1)
    expected = 0.0
    for n in range(2):
        for y in range(6):
            for x in range(7):
                expected += -weight[n, y, x].double() * log_p[n, target[n, y, x], y, x]
    expected /= 2 * 6 * 7
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="weight map"):
        weighted_cross_entropy(torch.randn(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="target"):
        weighted_cross_entropy(torch.randn(1, 5, 4, 4), torch.zeros(4, 4, dtype=torch.long), torch.ones(1, 4, 4))


@pytest.mark.parametrize(
    ("size", "binary"), [((64, 64), True), ((48, 80), True), ((32, 32), False)], ids=["64x64", "48x80", "soft-target"]
)
def test_perceptual_loss_matches_naive_vgg16(vgg_file, perceptual, size, binary):
    """Value and gradient against the reference formulation: 3-channel maps through torchvision's VGG16."""
    features = vgg_file[1]
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 1, *size, generator=g, requires_grad=True)
    target = torch.rand(3, 1, *size, generator=g)
    if binary:  # the contour maps of training
        target = (target > 0.8).float()
    pred_ref = pred.detach().clone().requires_grad_(True)

    loss = perceptual(pred, target)
    expected = naive_perceptual(features, pred_ref, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # evaluation (no graph) gives the same value
        assert perceptual(pred, target).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    rel = ((pred.grad - pred_ref.grad).norm() / pred_ref.grad.norm()).item()
    # float32 rounding (the folded conv1_1, another summation order in NHWC) can flip a ReLU or a max-pool
    # choice between near-equal values, which moves the gradient of a few pixels
    assert rel < 1e-3


def test_perceptual_loss_rejects_other_shapes(perceptual):
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        perceptual(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        perceptual(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 18))


def test_segmentation_loss_combines_the_parts(vgg_file):
    path, features = vgg_file
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 32, 32, generator=g)
    target = torch.randint(0, 5, (2, 32, 32), generator=g)
    weight = 1 + torch.rand(2, 32, 32, generator=g)
    total, parts = SegmentationLoss(beta=0.1, vgg_weights=path)(logits, target, weight)

    ce = weighted_cross_entropy(logits, target, weight)
    contour_prob = torch.softmax(logits, dim=1)[:, 4:5]
    per = naive_perceptual(features, contour_prob, (target == 4).unsqueeze(1).float())
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["perceptual"].item() == pytest.approx(per.item(), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + 0.1 * per.item(), rel=1e-5)


def test_beta_zero_never_builds_vgg(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("VGG16 must not be built when beta = 0")

    monkeypatch.setattr(losses, "VGG16Features", forbidden)
    criterion = SegmentationLoss(beta=0.0)
    assert criterion.perceptual is None and list(criterion.parameters()) == []
    assert criterion.vgg_pretrained is None
    logits = torch.randn(1, 5, 8, 8, requires_grad=True)
    total, parts = criterion(logits, torch.zeros(1, 8, 8, dtype=torch.long), torch.ones(1, 8, 8))
    assert parts["perceptual"].item() == 0 and total.item() == pytest.approx(parts["ce"].item())
    total.backward()
    assert logits.grad is not None


def test_negative_beta_is_rejected():
    with pytest.raises(ValueError, match="beta"):
        SegmentationLoss(beta=-0.1)


def test_no_gradient_reaches_vgg(vgg_file):
    criterion = SegmentationLoss(beta=0.1, vgg_weights=vgg_file[0])
    criterion.train()  # a trainer calling .train() on everything must not switch VGG out of eval mode
    logits = torch.randn(2, 5, 32, 32, requires_grad=True)
    total, _ = criterion(logits, torch.randint(0, 5, (2, 32, 32)), torch.ones(2, 32, 32))
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    vgg = criterion.perceptual.vgg
    assert not vgg.training
    for p in list(vgg.parameters()) + list(vgg.buffers()):
        assert not p.requires_grad and p.grad is None


def test_vgg_weights_unreachable_fall_back_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        criterion = SegmentationLoss(beta=0.1, vgg_weights="imagenet")
    assert len([w for w in caught if issubclass(w.category, PretrainedWeightsWarning)]) == 1
    assert criterion.vgg_pretrained is False
    assert criterion.info["vgg_pretrained"] is False
    assert "random init" in criterion.info["vgg_weights_source"]


def test_vgg_conv1_folding_is_exact(vgg_file):
    path, features = vgg_file
    x = torch.rand(1, 1, 16, 16)
    folded = VGG16Features(path).layers[0](x)
    assert torch.allclose(folded, features[0](x.repeat(1, 3, 1, 1)), atol=1e-5)
