"""Cost of the perceptual loss in a training step of resunet34 (issue 4: with it <= 2x without it).

One training step = forward, loss, backward, Adam step, on random data of the training shape
(default batch 8 x 3 x 224 x 224, 2 CPU threads). Three variants are timed in the same run, interleaved
so that machine noise spreads over all of them:

- ``beta=0``: weighted cross-entropy only (no VGG is built);
- ``beta=0.1``: ``nucleiseg.losses.SegmentationLoss`` (plain torch: frozen VGG16 cut at relu4_3, the
  target's features without a graph, conv1_1 folded to one channel, channels-last);
- ``naive``: the reference code's formulation of the same loss (softmax contour map repeated to 3
  channels, the whole VGG16 ``features`` with trainable parameters, the target's features with a graph).

It also checks that nucleiseg's and the naive formulation give the same loss value (relative difference
<= 1e-4) and the same gradient with respect to the logits (<= 1e-3: float32 gradients through ReLUs); the
exit status is 1 when they do not.

    python benchmarks/bench_perceptual.py [--batch 8] [--size 224] [--steps 3] [--threads 2] [--no-naive]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nucleiseg.losses import CONTOUR_CLASS, VGG16_LAYERS, SegmentationLoss
from nucleiseg.models import create_model

TOLERANCE = 1e-4  # loss values
# Gradients: ReLU masks flip on rounding-level differences, so float32 gradients differ more than values do;
# the naive float32 gradient itself is ~3e-5 away from a float64 computation at 2x224x224.
GRAD_TOLERANCE = 1e-3


class NaivePerceptual(nn.Module):
    """The reference code's formulation: full VGG16 features, 3-channel input, graph for both branches."""

    def __init__(self, vgg: nn.Sequential, beta: float) -> None:
        super().__init__()
        self.vgg, self.beta = vgg, beta

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in VGG16_LAYERS.values():
                out.append(x)
        return out

    def perceptual(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = F.softmax(logits, dim=1)[:, CONTOUR_CLASS : CONTOUR_CLASS + 1].repeat(1, 3, 1, 1)
        true = (target == CONTOUR_CLASS).unsqueeze(1).float().repeat(1, 3, 1, 1)
        pairs = zip(self.features(pred), self.features(true), strict=True)
        loss = sum(((a - b) ** 2).sum() / a.numel() for a, b in pairs)
        return loss / 4

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
        nll = F.nll_loss(F.log_softmax(logits, dim=1), target, reduction="none")
        ce = (nll * weight).mean()
        per = self.perceptual(logits, target)
        return ce + self.beta * per, {"ce": ce.detach(), "perceptual": per.detach()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fake_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    image = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, 5, (batch, size, size), generator=generator)
    weight = 1 + 10 * torch.rand(batch, size, size, generator=generator)
    return image, target, weight


def check_equal(ours: SegmentationLoss, naive: NaivePerceptual, size: int) -> bool:
    """Same perceptual loss and same gradient of it with respect to the logits; same total loss."""
    g = torch.Generator().manual_seed(1)
    batch = 2
    logits = (3 * torch.randn(batch, 5, size, size, generator=g)).requires_grad_(True)
    target = torch.randint(0, 5, (batch, size, size), generator=g)
    weight = 1 + 10 * torch.rand(batch, size, size, generator=g)

    def perceptual_ours(z: torch.Tensor) -> torch.Tensor:
        contour_prob = F.softmax(z, dim=1)[:, CONTOUR_CLASS : CONTOUR_CLASS + 1]
        return ours.perceptual(contour_prob, (target == CONTOUR_CLASS).unsqueeze(1).float())

    values, grads = [], []
    for perceptual in (perceptual_ours, lambda z: naive.perceptual(z, target)):
        (grad,) = torch.autograd.grad(loss := perceptual(logits), logits)
        values.append(loss.detach())
        grads.append(grad)
    rel_per = ((values[0] - values[1]).abs() / values[1].abs()).item()
    rel_grad = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    with torch.no_grad():
        total_o, total_n = ours(logits, target, weight)[0], naive(logits, target, weight)[0]
    rel_total = ((total_o - total_n).abs() / total_n.abs()).item()
    ok = max(rel_per, rel_total) <= TOLERANCE and rel_grad <= GRAD_TOLERANCE
    print(
        f"nucleiseg vs naive ({batch}x{size}x{size}): perceptual {values[0].item():.6g} vs {values[1].item():.6g} "
        f"(rel diff {rel_per:.1e}), its logits gradient rel diff {rel_grad:.1e}, total loss rel diff "
        f"{rel_total:.1e} -> {'OK' if ok else 'MISMATCH'} (tolerance {TOLERANCE:g}, gradient {GRAD_TOLERANCE:g})"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="crop side, divisible by 32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--no-naive", action="store_true", help="skip timing the naive formulation")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # no ImageNet weights offline: random VGG/encoder are as costly

    vgg = make_layers(cfgs["D"], batch_norm=False)
    with tempfile.TemporaryDirectory() as tmp:  # nucleiseg's loss loads the very same VGG weights
        path = os.path.join(tmp, "vgg16_features.pth")
        torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, path)
        ours = SegmentationLoss(args.beta, vgg_weights=path)
    naive = NaivePerceptual(vgg, args.beta)
    baseline = SegmentationLoss(0.0)

    model = create_model("resunet34", encoder_weights="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    image, target, weight = fake_batch(args.batch, args.size, torch.Generator().manual_seed(0))

    def step(criterion: nn.Module) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = criterion(model(image), target, weight)
            loss.backward()
            optimizer.step()

        return run

    variants = {"beta=0": step(baseline), f"beta={args.beta:g}": step(ours)}
    if not args.no_naive:
        variants[f"naive beta={args.beta:g}"] = step(naive)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up: allocator, oneDNN kernels
        run()
    for _ in range(args.steps):
        for name, run in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    print(
        f"machine: {cpu_name()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"{args.threads} threads; resunet34 training step (forward, loss, backward, Adam) at batch "
        f"{args.batch}x3x{args.size}x{args.size}; median of {args.steps} steps after a warm-up"
    )
    base = statistics.median(wall["beta=0"])
    for name in variants:
        med = statistics.median(wall[name])
        print(
            f"  {name:<16} {med:7.2f} s/step (min {min(wall[name]):.2f}, cpu {statistics.median(cpu[name]):.2f} s)"
            f"   ratio to beta=0: {med / base:.2f}"
        )
    name = f"beta={args.beta:g}"
    ratio = statistics.median(wall[name]) / base
    cpu_ratio = statistics.median(cpu[name]) / statistics.median(cpu["beta=0"])
    print(
        f"perceptual-loss step / plain step = {ratio:.2f} wall, {cpu_ratio:.2f} CPU time "
        f"(target <= 2.00: {'met' if ratio <= 2 else 'NOT met'}; on a loaded machine trust the CPU-time ratio "
        "of a --threads 1 run more)"
    )
    return 0 if check_equal(ours, naive, args.size) else 1


if __name__ == "__main__":
    raise SystemExit(main())
