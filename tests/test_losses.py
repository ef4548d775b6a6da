"""Losses against direct computations: eq. 1 by hand, eq. 3 through a plain torchvision VGG16."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from nucleiseg import losses
from nucleiseg.losses import PerceptualLoss, SegmentationLoss, VGG16Features, weighted_cross_entropy
from nucleiseg.models import feature_taps, winograd
from nucleiseg.models.winograd import FrozenWinogradConv2d, winograd_conv3x3
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
    """Both evaluations of the loss, built once: plain and CPU-optimized."""
    return {flag: PerceptualLoss(vgg_file[0], cpu_optimized=flag) for flag in (False, True)}


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


@pytest.mark.parametrize("cpu_optimized", [False, True], ids=["plain", "cpu-optimized"])
@pytest.mark.parametrize(
    ("size", "binary"), [((64, 64), True), ((48, 80), True), ((32, 32), False)], ids=["64x64", "48x80", "soft-target"]
)
def test_perceptual_loss_matches_naive_vgg16(vgg_file, perceptual, cpu_optimized, size, binary):
    features = vgg_file[1]
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 1, *size, generator=g, requires_grad=True)  # the CPU path's chunks of 2: 2 + 1
    target = torch.rand(3, 1, *size, generator=g)
    if binary:  # the contour maps of training: the CPU copy takes the table look-up path for them
        target = (target > 0.8).float()
    pred_ref = pred.detach().clone().requires_grad_(True)

    loss = perceptual[cpu_optimized](pred, target)
    expected = naive_perceptual(features, pred_ref, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # evaluation (no graph) gives the same value
        assert perceptual[cpu_optimized](pred, target).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    rel = ((pred.grad - pred_ref.grad).norm() / pred_ref.grad.norm()).item()
    # float32 rounding can flip a ReLU or a max-pool choice between near-equal values, which moves the
    # gradient of a few pixels (measured: up to 2.5e-4 in norm with F(6x6, 3x3), 7e-7 without a flip)
    assert rel < 1e-3


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


@pytest.mark.parametrize("cpu_optimized", [False, True], ids=["plain", "cpu-optimized"])
def test_no_gradient_reaches_vgg(vgg_file, cpu_optimized):
    criterion = SegmentationLoss(beta=0.1, vgg_weights=vgg_file[0], cpu_optimized=cpu_optimized)
    criterion.train()  # a trainer calling .train() on everything must not switch VGG out of eval mode
    logits = torch.randn(2, 5, 32, 32, requires_grad=True)
    total, _ = criterion(logits, torch.randint(0, 5, (2, 32, 32)), torch.ones(2, 32, 32))
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    networks = [criterion.perceptual.vgg, criterion.perceptual.network(torch.device("cpu"))]
    for net in networks:
        assert not net.training
        for p in list(net.parameters()) + list(net.buffers()):
            assert not p.requires_grad and p.grad is None


def test_vgg_weights_unreachable_fall_back_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        criterion = SegmentationLoss(beta=0.1, vgg_weights="imagenet")
    assert len([w for w in caught if issubclass(w.category, PretrainedWeightsWarning)]) == 1
    assert criterion.vgg_pretrained is False
    assert criterion.info["vgg_pretrained"] is False
    assert "random init" in criterion.info["vgg_weights_source"]


def test_binary_stem_gives_the_same_features(perceptual):
    vgg = perceptual[False].vgg
    fast = perceptual[True].network(torch.device("cpu"))
    t = (torch.rand(2, 1, 24, 40) > 0.7).float()
    t[0, 0, 0, :] = 1  # patterns touching the border
    with torch.no_grad():
        for plain, looked_up in zip(vgg(t), fast.forward_binary(t), strict=True):
            assert torch.allclose(plain, looked_up, atol=1e-5 * plain.abs().max().item())


def test_vgg_conv1_folding_is_exact(vgg_file):
    path, features = vgg_file
    x = torch.rand(1, 1, 16, 16)
    folded = VGG16Features(path).layers[0](x)
    assert torch.allclose(folded, features[0](x.repeat(1, 3, 1, 1)), atol=1e-5)


needs_compiler = pytest.mark.skipif(winograd._transforms() is None, reason="no C compiler for the compiled kernels")
IMPLEMENTATIONS = [pytest.param(True, id="compiled", marks=needs_compiler), pytest.param(False, id="torch-ops")]


ALGORITHMS = [
    pytest.param(True, 4, id="F4-compiled", marks=needs_compiler),
    pytest.param(True, 6, id="F6-compiled", marks=needs_compiler),
    pytest.param(False, 4, id="F4-torch-ops"),
]


@pytest.mark.parametrize(("compiled", "tile"), ALGORITHMS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("shape", [(2, 8, 16, 12, 20), (1, 8, 8, 7, 9), (3, 136, 24, 16, 16)])
def test_winograd_convolution_matches_conv2d(shape, relu, compiled, tile, monkeypatch):
    """Forward and input gradient against conv2d, with whole and partial tiles (7x9, 12x20 for 6x6 tiles)."""
    if not compiled:  # the layer's default path: make it the torch-op one
        monkeypatch.setattr(winograd, "_transforms", lambda: None)
    n, c, k, h, w = shape
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, k, 3, padding=1)
    fast = FrozenWinogradConv2d.from_conv(conv, relu=relu, tile=tile)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = fast(x)
    y_ref = torch.relu(conv(x_ref)) if relu else conv(x_ref)
    tolerance = 1e-5 if tile == 4 else 3e-5  # F(6x6, 3x3) rounds a little more: its transforms have larger terms
    assert torch.allclose(y, y_ref, atol=tolerance * y_ref.abs().max().item())
    grad = torch.randn_like(y_ref)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=tolerance * x_ref.grad.abs().max().item())
    # small chunks: several images and several bands of tile rows per call give the same result
    # (the matrix products' rounding may depend on their sizes: the same tolerance as against conv2d)
    chunked = winograd_conv3x3(x.detach(), fast.u, fast.bias, relu=relu, max_tiles=2, compiled=compiled)
    assert torch.allclose(chunked, y.detach(), atol=tolerance * y_ref.abs().max().item())


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_winograd_input_mask_is_a_relu_backward(compiled):
    """``input_mask`` zeroes the input where the mask is not positive: the gradient through a fused ReLU."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    fast = FrozenWinogradConv2d.from_conv(conv)
    x, mask = torch.randn(2, 16, 10, 14), torch.randn(2, 16, 10, 14).relu()
    y = winograd_conv3x3(x, fast.u, fast.bias, input_mask=mask, compiled=compiled)
    assert torch.allclose(y, conv(x * (mask > 0)), atol=1e-5 * y.abs().max().item())


def test_winograd_falls_back_to_torch_ops_for_odd_channel_counts():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 3, padding=1)
    fast = FrozenWinogradConv2d.from_conv(conv)
    x = torch.randn(1, 5, 7, 9)
    assert torch.allclose(fast(x), conv(x), atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 8"):
        winograd_conv3x3(x, fast.u, fast.bias, compiled=True)
    # F(6x6, 3x3) exists compiled only: a clear error rather than a silent change of algorithm
    with pytest.raises(ValueError, match="compiled"):
        FrozenWinogradConv2d.from_conv(conv, tile=6)(x)


def unfused_tap(a: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.relu(a)
    return ((r - target) ** 2).mean(), torch.nn.functional.max_pool2d(r, 2)


@pytest.mark.skipif(not feature_taps.available(torch.zeros(1, 8, 1, 1)), reason="no C compiler for the kernels")
@pytest.mark.parametrize("shape", [(2, 16, 12, 20), (1, 8, 7, 9)], ids=["even", "odd"])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "no-pool"])
def test_fused_tap_matches_torch_ops(shape, pool):
    """ReLU, distance to the target and 2x2 max-pool in one op: values and gradients as torch's ops, on odd
    sizes (floor pooling) and with ties (a block of equal values: the gradient goes to the first one)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    a[:, :, :2, :2] = 0.5  # a tie in the first pooling window
    target = torch.randn(*shape, generator=g).relu()
    a_fused, a_ref = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    term, pooled = feature_taps.fused_tap(a_fused, target, pool)
    term_ref, pooled_ref = unfused_tap(a_ref, target)
    assert term.item() == pytest.approx(term_ref.item(), rel=1e-6)
    grad_pooled = torch.randn(pooled_ref.shape, generator=g)
    loss_ref = 3.0 * term_ref + (pooled_ref * grad_pooled).sum() if pool else 3.0 * term_ref
    loss_ref.backward()
    if pool:
        assert torch.equal(pooled, pooled_ref)
        (3.0 * term + (pooled * grad_pooled).sum()).backward()
    else:
        assert pooled is None
        (3.0 * term).backward()
    assert torch.allclose(a_fused.grad, a_ref.grad, atol=1e-6 * a_ref.grad.abs().max().item())


def test_fused_tap_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="do not match"):
        feature_taps.fused_tap(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 5), pool=True)
