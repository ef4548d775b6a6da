"""Whole slides: throughput of the slide path against the tile path on the same pixels, and peak memory on two
slide sizes.

Throughput (``--throughput-size S``, default 8192): an S x S synthetic 40x slide covered with tissue (a mosaic of
synthetic tiles, JPEG tiles as scanners write) through the paper's ResUNet34 with params' default inference
(224 / 80 tiles, batch 8, no TTA) on ``--threads`` threads (2). Random weights (speed does not depend on them),
with the output head shifted so that about a tenth of the pixels come out as nuclei: the measuring and writing
work is then real. Each path runs in its own subprocess:

- **tile path**: the level-0 pixels read into memory in one piece, :meth:`nucleiseg.infer.Predictor.label` (tiled
  prediction and post-processing) and :func:`nucleiseg.export.write_outputs` (label, overlay, GeoJSON, per-nucleus
  CSV): what ``nucleiseg predict`` does with one large tile;
- **slide path**: :func:`nucleiseg.streaming.segment_slide` on the slide file (``--chunk``, default params'
  ``slide.chunk``): tissue detection, chunks read with their margins, post-processing and measurement per chunk,
  atomic chunk commits, GeoJSON.gz / Parquet / maps (no spatial report: the tile path has none).

Printed: seconds and tissue megapixels per second of each (best of ``--repeats`` interleaved runs, after a warm-up
call), and what the slide path loses to reading, stitching and writing, ``1 - slide / tile`` throughput (target
< 15%), with the slide path's time per step and each run's peak resident memory. The margins' recomputation
depends on where chunks fall: an S-pixel slide has edge chunks only (one margin per chunk side at most), a large
slide mostly interior ones; the exact tile counts of both are printed, and the loss projected for a
60,000-pixel slide by scaling the measured slide-path time by the ratio of its tile count to this slide's.

Memory (``--sizes``, default 20000 60000): mosaic slides of those sides with ``--tissue`` (0.3) of tissue, each
through :func:`segment_slide` in a subprocess with the spatial report, and the peak resident memory of each
(``ru_maxrss``; target: flat, < 4 GiB). The network there is a stand-in, a 5 x 5 mean of darkness scored against
three levels (realistic nuclei, negligible compute), so that a 60,000-pixel slide takes minutes on a CPU rather
than hours; a real network adds its weights and one batch of activations, a constant seen in the throughput run's
peak. ``--memory-network resunet34`` runs the memory slides through ResUNet34 instead (for a GPU).

Run: ``python benchmarks/bench_slide.py [--threads 2] [--throughput-size 4096] [--sizes 20000 60000]
[--work DIR] [--device cpu]``. Slides are written to ``--work`` (default: a temporary folder, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

MEAN, STD = (0.7, 0.5, 0.7), (0.15, 0.2, 0.15)
NUCLEUS_SHARE = 0.1  # of the calibration tile's pixels: where the random head's background offset is put


def resunet34(device: str):  # -> Predictor
    """ResUNet34 with random weights whose output head is shifted so that about NUCLEUS_SHARE of the pixels of a
    synthetic tile come out as nucleus (inside of a tumor nucleus, the class the random head favours)."""
    import torch

    from nucleiseg.infer import Predictor, resolve_device
    from nucleiseg.models import create_model
    from nucleiseg.synth import synth_tile

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resunet34", encoder_weights="none").eval()
    image = synth_tile(0, 448)[0]
    x = (torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / (
        torch.tensor(STD).view(1, 3, 1, 1)
    )
    with torch.inference_mode():
        logits = model(x)[0]
    head = [name for name, value in model.state_dict().items() if name.endswith("bias") and value.shape == (5,)][-1]
    state = model.state_dict()
    centred = logits - logits.mean((1, 2), keepdim=True)
    state[head] -= logits.mean((1, 2))
    state[head][0] += torch.quantile((centred[1] - centred[0]).flatten(), 1 - NUCLEUS_SHARE)
    state[head][4] -= 10.0
    model.load_state_dict(state)
    model.to(resolve_device(device), memory_format=torch.channels_last)
    return Predictor(model=model, mean=MEAN, std=STD, device=str(resolve_device(device)))


def stand_in():  # -> Predictor
    """A network-shaped stand-in: the 5 maps score the 5 x 5 mean darkness against three levels."""
    import torch

    from nucleiseg.infer import Predictor

    class DarkNuclei(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.AvgPool2d(5, stride=1, padding=2)
            self.register_buffer("levels", torch.tensor([0.22, 0.38, 0.55, 9.0, 9.0]).view(1, 5, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -30 * (self.pool(1 - x.mean(1, keepdim=True)) - self.levels).abs()

    return Predictor(model=DarkNuclei().eval(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def recomputation(side: int, chunk: int, tile: int = 224, overlap: int = 80, margin_um: float = 30.0) -> float:
    """Inference tiles the slide path runs on a ``side`` x ``side`` view (chunks of ``k`` tiles a side plus ``e``
    margin tiles on each inner side, as :func:`nucleiseg.streaming.chunk_grid` lays them), over those of one
    whole-view tiling."""
    import math

    from nucleiseg.infer import axis_tiles

    n = len(axis_tiles(side, tile, overlap))
    stride = tile - overlap
    k, e = math.ceil(chunk / stride), max(1, math.ceil(round(margin_um / 0.25) / stride))
    per_axis = sum(min(n - 1, min(first + k, n) - 1 + e) - max(0, first - e) + 1 for first in range(0, n, k))
    return (per_axis / n) ** 2


def peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def child(args: argparse.Namespace) -> None:
    """One measured run (in its own process, so that its peak memory is its own); prints one JSON line."""
    import torch

    from nucleiseg.streaming import SlideSettings, segment_slide
    from nucleiseg.wsi import open_slide

    torch.set_num_threads(args.threads)
    predictor = stand_in() if args.network == "stand-in" else resunet34(args.device)
    if args.child != "memory":  # oneDNN creates its kernels on the first call: not part of either path's time
        predictor.label(np.full((448, 448, 3), 200, np.uint8))
    before = peak_mib()
    started = time.perf_counter()
    if args.child == "tile":
        from nucleiseg.export import write_outputs

        slide = open_slide(args.slide)
        image = slide.read_region((0, 0), 0, slide.level_dimensions[0])
        label = predictor.label(image)
        write_outputs(args.out, "tile", image, label, mpp=0.25)
        record = {"nuclei": int(np.count_nonzero(np.bincount(label.ravel())[1:]))}
    else:
        summary = segment_slide(
            args.slide, predictor, args.out, settings=SlideSettings(chunk=args.chunk),
            spatial=None if args.child == "memory" else False,
        )  # fmt: skip
        record = {k: summary[k] for k in ("nuclei", "chunks", "tissue_mm2", "seconds", "clipped", "spatial_report")}
    record.update(seconds_total=time.perf_counter() - started, peak_mib=peak_mib(), before_mib=before)
    print(json.dumps(record))


def run_child(mode: str, slide: Path, out: Path, args: argparse.Namespace, network: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--slide", str(slide), "--out", str(out),
               "--threads", str(args.threads), "--chunk", str(args.chunk), "--network", network,
               "--device", args.device]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_bench_slide(path: Path, side: int, tissue: float) -> float:
    from nucleiseg.slidegen import synthetic_sources, write_mosaic_slide

    started = time.perf_counter()
    write_mosaic_slide(path, side, 0.25, synthetic_sources(4, 1024, seed=0), tissue_fraction=tissue)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs of each path (best is kept)")
    parser.add_argument("--throughput-size", type=int, default=8192, help="side of the throughput slide (0: skip)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[20000, 60000], help="sides of the memory slides")
    parser.add_argument("--tissue", type=float, default=0.3, help="tissue share of the memory slides")
    parser.add_argument("--chunk", type=int, default=None, help="slide.chunk (default: params' default)")
    parser.add_argument("--memory-network", choices=["stand-in", "resunet34"], default="stand-in")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for the slides (default: temporary)")
    parser.add_argument("--child", choices=["tile", "slide", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--network", default="resunet34", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk is None:
        from nucleiseg.params import SlideParams

        args.chunk = SlideParams().chunk
    if args.child:
        child(args)
        return

    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_slide_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        print(f"machine: {machine}, device {args.device}; threads {args.threads}; slide.chunk {args.chunk}")
        if args.throughput_size:
            side = args.throughput_size
            path = work / f"throughput_{side}.tif"
            made = write_bench_slide(path, side, 1.0)
            print(f"\nthroughput: {side}x{side} slide, all tissue ({side**2 / 1e6:.1f} MP; written in {made:.1f} s), "
                  f"resunet34, 224/80 tiles, batch 8")  # fmt: skip
            runs: dict[str, list[dict]] = {"tile": [], "slide": []}
            for _ in range(args.repeats):  # interleaved: load from other jobs hits both paths alike
                for mode in runs:
                    runs[mode].append(run_child(mode, path, work / f"{mode}_out", args, "resunet34"))
            tile, slide = (min(runs[m], key=lambda r: r["seconds_total"]) for m in ("tile", "slide"))
            megapixels = slide["tissue_mm2"] / (0.25e-3) ** 2 / 1e6
            rate_tile, rate_slide = megapixels / tile["seconds_total"], megapixels / slide["seconds_total"]
            print(f"best of {args.repeats} interleaved runs each, every run in a fresh process")
            print(f"{'path':<12} {'seconds':>8} {'tissue MP/s':>12} {'nuclei':>8} {'peak RSS MiB':>13}")
            for name, run, rate in (("tile", tile, rate_tile), ("slide", slide, rate_slide)):
                print(f"{name:<12} {run['seconds_total']:8.1f} {rate:12.4f} {run['nuclei']:8d} {run['peak_mib']:13.0f}")
            steps = slide["seconds"]["chunks_total_by_step"]
            print(f"slide path steps (s): plan {slide['seconds']['plan']:.1f}, "
                  + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                  + f", outputs {slide['seconds']['finish']:.1f}; {slide['chunks']['on_tissue']} chunks")  # fmt: skip
            print(f"slide path loses {1 - rate_slide / rate_tile:.1%} of the tile path's throughput (target < 15%); "
                  f"nuclei {slide['nuclei']} vs {tile['nuclei']}")  # fmt: skip
            here, large = recomputation(side, args.chunk), recomputation(60000, args.chunk)
            projected = 1 - tile["seconds_total"] / (slide["seconds_total"] * large / here)
            print(f"margins: the slide path runs {here:.3f}x the tiles of one whole-slide tiling here, {large:.3f}x "
                  f"on a 60000 px slide; projected loss there: {projected:.1%}")  # fmt: skip
        if args.sizes:
            print(
                f"\nmemory: mosaic slides, {args.tissue:.0%} tissue, {args.memory_network} network, spatial report on"
            )
            print(f"{'side':>7} {'tissue MP':>10} {'chunks':>7} {'nuclei':>9} {'seconds':>8} {'peak RSS MiB':>13}"
                  f" {'after imports':>14}")  # fmt: skip
            peaks = []
            for side in args.sizes:
                path = work / f"memory_{side}.tif"
                made = write_bench_slide(path, side, args.tissue)
                run = run_child("memory", path, work / f"memory_out_{side}", args, args.memory_network)
                peaks.append(run["peak_mib"])
                tissue_mp = run["tissue_mm2"] / (0.25e-3) ** 2 / 1e6
                print(f"{side:7d} {tissue_mp:10.0f} {run['chunks']['on_tissue']:7d} {run['nuclei']:9d} "
                      f"{run['seconds_total']:8.0f} {run['peak_mib']:13.0f} {run['before_mib']:14.0f}"
                      f"   (written in {made:.0f} s)")  # fmt: skip
                path.unlink()
            if len(peaks) > 1:
                print(f"peak RSS largest / smallest slide: {max(peaks) / min(peaks):.2f}x; "
                      f"largest {max(peaks) / 1024:.2f} GiB (target: flat, < 4 GiB)")  # fmt: skip
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
