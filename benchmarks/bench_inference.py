"""Inference speed (and, with --memory, peak memory on a 10000 x 10000 image).

Speed: a 1000 x 1000 RGB tile through the paper's ResUNet34 (random weights: speed does not depend on them),
224 x 224 tiles with 80 pixels of overlap, no TTA, on ``--threads`` CPU threads (default 2), timed in one run:

- **reference**: the reference code's way (``split_forward`` in github.com/huiqu18/NucleiSegClas): zero-pad,
  run the tiles one at a time under ``torch.no_grad``, paste the centres into a full-size logit map, softmax,
  argmax;
- **nucleiseg**: :func:`nucleiseg.infer.predict_classes`: same tiles, batched (``--batch-size``, default 8),
  channels_last, ``torch.inference_mode``, normalised once per strip, argmax per batch (a row with the
  default NCHW memory format shows what channels_last brings).

Printed: seconds, megapixels per second, the ratio nucleiseg / reference, and the fraction of the machine's
fp32 matmul peak (a 4096 x 4096 ``torch.matmul`` measured in the same run, same threads) that the model's
FLOPs (``torch.utils.flop_counter.FlopCounterMode``, per tile x number of tiles) reach.
``--tile 512`` (or more) adds a row for a larger inference tile, a params choice (``infer.tile``) that cuts the
overlap's recomputation.

Backends (``--onnx``): the network's forward pass plus softmax on the same batches of normalised tiles, as the
:class:`nucleiseg.infer.Predictor` runs it (``nucleiseg.infer._TileRunner``, no TTA), by **torch** (channels_last,
``torch.inference_mode``) and by **onnxruntime** (:class:`nucleiseg.onnx_model.OnnxNetwork`: the ResUNet34 exported
with ``nucleiseg.onnx_model.export_onnx``, CPU execution provider, the same number of threads), interleaved, best of
``--repeats``: 224 x 224 tiles in batches of ``--batch-size`` and one 1024 x 1024 tile. Printed: seconds per batch,
tiles/s and megapixels/s of each, the ratio onnxruntime / torch, the export time and the largest probability
difference between the two; then the whole tiled prediction of the ``--size`` image (224/80 tiles,
:func:`nucleiseg.infer.predict_classes`) by each, and after how many such images the export on load is paid back.

Memory (``--memory``): :func:`nucleiseg.infer.predict_label` (tiles + post-processing) on a 10000 x 10000 image
with a 1x1-convolution stand-in network, in a subprocess; prints its peak resident memory.

Run: ``python benchmarks/bench_inference.py [--threads 2] [--repeats 2] [--tile 1024] [--memory] [--onnx]``
(``--skip-speed --onnx``: the backends alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np


def reference_split_forward(model, image: np.ndarray, mean, std, size: int = 224, overlap: int = 80) -> np.ndarray:
    """The reference code's tiled inference, re-implemented: one tile at a time, zero padding, full map."""
    import torch

    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    x = ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]
    _, c, h0, w0 = x.shape
    pad_h = (size - overlap) - (h0 - size) % (size - overlap) if h0 > size else 0
    pad_w = (size - overlap) - (w0 - size) % (size - overlap) if w0 > size else 0
    x = torch.cat([x, torch.zeros(1, c, pad_h, w0)], dim=2)
    x = torch.cat([x, torch.zeros(1, c, h0 + pad_h, pad_w)], dim=3)
    _, _, h, w = x.shape
    output = torch.zeros(1, 5, h, w)
    for i in range(0, h - overlap, size - overlap):
        r_end = min(i + size, h)
        r0 = i + overlap // 2 if i > 0 else 0
        r1 = i + size - overlap // 2 if i + size < h else h
        for j in range(0, w - overlap, size - overlap):
            c_end = min(j + size, w)
            with torch.no_grad():
                patch = model(x[:, :, i:r_end, j:c_end])
            c0 = j + overlap // 2 if j > 0 else 0
            c1 = j + size - overlap // 2 if j + size < w else w
            output[:, :, r0:r1, c0:c1] = patch[:, :, r0 - i : r1 - i, c0 - j : c1 - j]
    probs = torch.softmax(output[:, :, :h0, :w0], dim=1)[0]
    return probs.argmax(0).numpy().astype(np.uint8)


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> float:
    """Best fp32 matmul throughput (GFLOP/s) over a few runs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_flops(model, tile: int) -> float:
    """FLOPs of one ``tile x tile`` forward pass (batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, tile, tile))
    return float(counter.get_total_flops())


def timed(fn) -> tuple[float, float, object]:
    """Wall-clock and process CPU seconds of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def run_speed(args: argparse.Namespace) -> None:
    import torch

    from nucleiseg.infer import axis_tiles, predict_classes
    from nucleiseg.models import create_model

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resunet34", encoder_weights="none").eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    mean, std = (0.7, 0.5, 0.7), (0.15, 0.15, 0.15)
    megapixels = args.size**2 / 1e6
    n_tiles = len(axis_tiles(args.size, 224, 80)) ** 2
    flops_tile = model_flops(model, 224)

    paths = {
        "reference (tiles one at a time)": (
            lambda: reference_split_forward(model, image, mean, std),
            n_tiles * flops_tile,
        ),
        f"nucleiseg (batch {args.batch_size}, channels_last: the default)": (
            lambda: predict_classes(model, image, mean, std, tile=224, overlap=80, batch_size=args.batch_size),
            n_tiles * flops_tile,
        ),
        f"nucleiseg (batch {args.batch_size}, contiguous)": (
            lambda: predict_classes(
                model, image, mean, std, tile=224, overlap=80, batch_size=args.batch_size, channels_last=False
            ),
            n_tiles * flops_tile,
        ),
    }
    if args.tile:
        n_large = len(axis_tiles(args.size, args.tile, 80)) ** 2
        paths[f"nucleiseg (tile {args.tile}, overlap 80: {n_large} tiles)"] = (
            lambda: predict_classes(model, image, mean, std, tile=args.tile, overlap=80, batch_size=1),
            n_large * model_flops(model, args.tile),
        )

    # Warm-up (oneDNN primitive creation) on one tile each way.
    predict_classes(model, image[:224, :224], mean, std, batch_size=args.batch_size)
    reference_split_forward(model, image[:224, :224], mean, std)
    peak = matmul_peak_gflops()
    # Interleaved repeats, best of each: the machine may be shared, and load hits all paths alike.
    best = {name: (float("inf"), float("inf")) for name in paths}
    outputs = {}
    for _ in range(args.repeats):
        for name, (fn, _) in paths.items():
            wall, cpu, outputs[name] = timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    peak = max(peak, matmul_peak_gflops())
    names = list(paths)
    agree = float(np.mean(outputs[names[0]] == outputs[names[1]]))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"threads: {args.threads}, image {args.size}x{args.size}, no TTA, best of {args.repeats} interleaved runs")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (4096^2 torch.matmul, best of the runs before and after)")
    per_image = n_tiles * flops_tile / 1e9
    print(f"model: resunet34, {flops_tile / 1e9:.2f} GFLOP per 224x224 tile; tile 224 overlap 80: {n_tiles} tiles, "
          f"{per_image:.0f} GFLOP per image")  # fmt: skip
    print(f"{'path':<52} {'wall s':>7} {'cpu s':>7} {'MP/s':>7} {'GFLOP/s':>8} {'of peak':>8}")
    for name, (_, flops) in paths.items():
        wall, cpu = best[name]
        achieved = flops / wall / 1e9
        print(f"{name:<52} {wall:7.2f} {cpu:7.2f} {megapixels / wall:7.3f} {achieved:8.1f} {achieved / peak:8.1%}")
    ref, ours = best[names[0]], best[names[1]]
    print(
        f"speed-up nucleiseg / reference at 224/80: {ref[0] / ours[0]:.2f}x wall, {ref[1] / ours[1]:.2f}x CPU time "
        f"(target >= 2x); {args.size}x{args.size} in {ours[0]:.2f} s (target < 3 s for 1000x1000)"
    )
    print(f"argmax maps agree on {agree:.2%} of pixels (zero vs reflect padding differs near the bottom/right border)")


def run_onnx(args: argparse.Namespace) -> None:
    import torch

    from nucleiseg.infer import _TileRunner
    from nucleiseg.models import create_model
    from nucleiseg.onnx_model import OPSET, OnnxNetwork, export_onnx

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resunet34", encoder_weights="none").eval()
    started = time.perf_counter()
    network = OnnxNetwork(export_onnx(model, {"input_divisor": 32}))  # intra-op threads: torch's, args.threads
    export_seconds = time.perf_counter() - started
    model.to(memory_format=torch.channels_last)  # as load_predictor holds it
    cpu = torch.device("cpu")
    runners = {"torch": _TileRunner(model, cpu, False, None), "onnxruntime": _TileRunner(network, cpu, False, None)}
    rng = np.random.default_rng(0)
    cases = [(224, args.batch_size), (1024, 1)]
    import onnxruntime

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")  # fmt: skip
    print(f"threads: {args.threads} (torch.set_num_threads; onnxruntime intra_op_num_threads), best of "
          f"{args.repeats} interleaved runs; export to ONNX (opset {OPSET}): {export_seconds:.1f} s")  # fmt: skip
    print(f"{'tiles':<22} {'backend':<12} {'s/batch':>8} {'cpu s':>7} {'tiles/s':>8} {'MP/s':>7} {'max |dp|':>9}")
    for side, batch in cases:
        x = torch.from_numpy(rng.standard_normal((batch, 3, side, side), dtype=np.float32))
        best = {name: (float("inf"), float("inf")) for name in runners}
        outputs = {}
        with torch.inference_mode():
            for runner in runners.values():
                runner(x)  # warm-up: oneDNN primitives, ONNX Runtime's first-run allocations
            for _ in range(args.repeats):
                for name, runner in runners.items():
                    wall, cpu_s, outputs[name] = timed(lambda runner=runner, x=x: runner(x))
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu_s))
        difference = float((outputs["onnxruntime"] - outputs["torch"]).abs().max())
        for name in runners:
            wall, cpu_s = best[name]
            label = f"{batch} x {side}x{side}"
            shown = f"{difference:9.1e}" if name == "onnxruntime" else f"{'':>9}"
            print(f"{label:<22} {name:<12} {wall:8.2f} {cpu_s:7.2f} {batch / wall:8.2f} "
                  f"{batch * side * side / wall / 1e6:7.3f} {shown}")  # fmt: skip
        ratio = best["torch"][0] / best["onnxruntime"][0]
        print(f"{'':<22} onnxruntime / torch throughput: {ratio:.2f}x ({'faster' if ratio > 1 else 'slower'})")

    # The whole tiled prediction of a --size image (224/80 tiles), as predict runs it: tiling and argmax included.
    from nucleiseg.infer import predict_classes

    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    mean, std = (0.7, 0.5, 0.7), (0.15, 0.15, 0.15)
    networks = {"torch": model, "onnxruntime": network}
    best = {name: float("inf") for name in networks}
    for _ in range(args.repeats):
        for name, net in networks.items():
            wall, _, _ = timed(lambda net=net: predict_classes(net, image, mean, std, batch_size=args.batch_size))
            best[name] = min(best[name], wall)
    torch_s, onnx_s = best["torch"], best["onnxruntime"]
    line = (
        f"{args.size}x{args.size} image, 224/80 tiles, batch {args.batch_size} (predict_classes): "
        f"torch {torch_s:.2f} s, onnxruntime {onnx_s:.2f} s: {torch_s / onnx_s:.2f}x"
    )
    if onnx_s < torch_s:
        line += f"; the export on load pays for itself after {export_seconds / (torch_s - onnx_s):.1f} such images"
    print(line)


_MEMORY_CHILD = """
import json, resource, sys, time
import numpy as np, torch
from torch import nn
from nucleiseg.infer import predict_label
torch.set_num_threads(int(sys.argv[2]))
side = int(sys.argv[1])
rng = np.random.default_rng(0)
# Dark 8x8 blocks ("nuclei", ~30% of the area) on a bright background, built in row blocks to keep the
# baseline at the image itself.
dark = rng.random((side // 8, side // 8)) < 0.3
image = np.empty((side, side, 3), np.uint8)
for y in range(0, side, 800):
    rows = np.repeat(np.repeat(dark[y // 8 : (y + 800) // 8], 8, 0), 8, 1)
    image[y : y + 800] = np.where(rows, np.uint8(60), np.uint8(220))[..., None]
model = nn.Conv2d(3, 5, 1).eval()
with torch.no_grad():
    model.weight.zero_(); model.bias.zero_()
    model.weight[0, :, 0, 0] = 1.0
    model.weight[1:4, :, 0, 0] = -torch.eye(3) * torch.tensor([1.0, 1.05, 1.1])[:, None]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
label = predict_label(model, image, (0.5,) * 3, (0.25,) * 3)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": seconds,
                  "nuclei": int(np.count_nonzero(np.bincount(label.ravel())[1:]))}))
"""


def run_memory(args: argparse.Namespace) -> None:
    side = args.memory_side
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(side), str(args.threads)], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"memory run failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"memory: predict_label on {side}x{side} (1x1-conv stand-in network, tiles 224/80 + post-processing): "
        f"peak RSS {result['peak_mib']:.0f} MiB ({result['before_mib']:.0f} MiB before, including the "
        f"{side * side * 3 / 2**20:.0f} MiB image), {result['nuclei']} nuclei, {result['seconds']:.0f} s; "
        f"limit 4096 MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tile", type=int, default=0, help="also time this larger inference tile (e.g. 1024)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory on a huge image")
    parser.add_argument("--memory-side", type=int, default=10000)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--onnx", action="store_true", help="also compare the torch and onnxruntime backends")
    args = parser.parse_args()
    if not args.skip_speed:
        run_speed(args)
    if args.onnx:
        run_onnx(args)
    if args.memory:
        run_memory(args)


if __name__ == "__main__":
    main()
