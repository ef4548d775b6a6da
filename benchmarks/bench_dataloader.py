"""Does data loading keep up with training? Samples per second of the training DataLoader.

Cuts 250x250 patches (4x4 grid) from real CoNSeP tiles (``../shared/realdata/consep/train``; synthetic
tiles when absent), then loads batches of 8 augmented 224x224 samples (read, flips/affine/elastic/crop,
targets, weight map, normalisation) with 2 worker processes and, as the plain reference measured in the
same run, in the main process (0 workers). Prints samples/s, the ratio 2 workers / 0 workers, and the
ratio against what training consumes (batch 8 per ~3 s step on 2 CPU cores: ~2.7 samples/s; ~0.8
samples/s with the VGG perceptual loss). Also prints the time per stage of one sample.

    .venv/bin/python benchmarks/bench_dataloader.py [--tiles 4] [--batches 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONSEP = Path(os.environ.get("NUCLEISEG_CONSEP_DIR", REPO.parent / "shared" / "realdata" / "consep" / "train"))
STEP_SECONDS = {"weighted CE (3 s/step)": 3.0, "+ VGG perceptual (10 s/step)": 10.0}
BATCH = 8


def make_patches(out: Path, n_tiles: int) -> tuple[list, str]:
    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label
    from nucleiseg.prepare import write_patches
    from nucleiseg.synth import synth_tile

    if (CONSEP / "train_1_label.png").is_file():
        source = f"real CoNSeP tiles from {CONSEP}"
        names = [f"train_{i}" for i in range(1, n_tiles + 1)]
        for name in names:
            other = CONSEP / f"{name}_other.png"
            write_patches(
                read_image(CONSEP / f"{name}.png"),
                read_label(CONSEP / f"{name}_label.png"),
                read_label(other) if other.is_file() else None,
                out,
                name,
            )
    else:
        source = "synthetic tiles (real CoNSeP tiles not found)"
        for i in range(n_tiles):
            image, label = synth_tile(i, 1000)
            write_patches(image, label, None, out, f"synth_{i}")
    from nucleiseg.data import list_patches

    return list_patches(out), source


def throughput(dataset, workers: int, batches: int) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch: worker start-up included)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    # Sampling with replacement: as many batches as asked for, whatever the number of patches.
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=(batches + 1) * BATCH, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            images, _, _ = next(it)
        except StopIteration:
            break
        n += images.shape[0]
    return n / (time.perf_counter() - t1), t_first


def stage_times(items, transform, repeats: int = 20) -> dict[str, float]:
    from nucleiseg.data import augment
    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label, targets
    from nucleiseg.weightmap import weight_map

    totals = dict.fromkeys(("read", "augment", "targets", "weight map"), 0.0)
    for k in range(repeats):
        image_path, label_path, other_path = items[k % len(items)]
        t = time.perf_counter()
        image, label = read_image(image_path), read_label(label_path)
        other = read_label(other_path) if other_path is not None else None
        totals["read"] += time.perf_counter() - t
        t = time.perf_counter()
        _, label, _ = augment(transform, image, label, other)
        totals["augment"] += time.perf_counter() - t
        t = time.perf_counter()
        targets(label)
        totals["targets"] += time.perf_counter() - t
        t = time.perf_counter()
        weight_map(label, 10.0, 5.0)
        totals["weight map"] += time.perf_counter() - t
    return {k: 1000 * v / repeats for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=4, help="tiles to cut into patches (16 each)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches of 8 per setting")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch

    from nucleiseg.data import NucleiDataset, build_augmentation
    from nucleiseg.io import read_image
    from nucleiseg.params import AugmentationParams, LossParams
    from nucleiseg.prepare import channel_stats

    torch.set_num_threads(1)
    aug, loss = AugmentationParams(), LossParams()
    with tempfile.TemporaryDirectory() as tmp:
        items, source = make_patches(Path(tmp), args.tiles)
        mean, std = channel_stats(read_image(p) for p, _, _ in items)
        transform = build_augmentation(**aug.model_dump(), seed=0)
        dataset = NucleiDataset(items, transform, mean=mean, std=std, w0=loss.w0, sigma=loss.sigma)
        print(f"data: {len(items)} patches of 250x250 from {source}; crops {aug.crop}, batch {BATCH}")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")
        stages = stage_times(items, build_augmentation(**aug.model_dump(), seed=1))
        print("per sample (main process): " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
        reference, ref_first = throughput(dataset, 0, args.batches)
        workers, first = throughput(dataset, args.workers, args.batches)
    print(f"0 workers (reference): {reference:6.1f} samples/s  (first batch {ref_first:.2f} s)")
    print(
        f"{args.workers} workers:             {workers:6.1f} samples/s  (first batch {first:.2f} s, start-up included)"
    )
    print(f"ratio {args.workers} workers / 0 workers: {workers / reference:.2f}x")
    for what, seconds in STEP_SECONDS.items():
        need = BATCH / seconds
        print(f"training needs {need:.2f} samples/s ({what}): loader supplies {workers / need:.0f}x that")


if __name__ == "__main__":
    main()
