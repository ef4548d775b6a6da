"""Peak memory of predicting one large image with Macenko stain normalisation (issue 15): streamed vs whole-image.

The demo preset and both presets normalise stain with Macenko. Before, ``Predictor.label`` normalised the whole
image at once in float64 (about 88 bytes per pixel of temporaries: 9.5 GB resident after 38 s on a 12000 x 12000
image). Now the image's stain is measured in blocks of rows and each strip of tiles is normalised in float32 as it
is cut (:meth:`nucleiseg.infer.Predictor.stain_transform`). Each case runs in its own process on the same PNG and
the same model; its peak resident memory (``ru_maxrss``) is printed with the bytes per pixel, in all and above
the **baseline** (Python, torch, MLflow, the model and the decoded image: ``read_image`` alone):

- **whole** (reference, the previous path): ``read_image``, ``stain.transform`` of the whole image,
  :func:`nucleiseg.infer.predict_classes` on the normalised image, :func:`nucleiseg.postprocess.postprocess`;
- **streamed**: ``read_image``, :meth:`Predictor.label` (stain per strip, then the same post-processing);
- **predict**: the ``nucleiseg predict`` command on the file (what a user runs: also writes the label, overlay,
  GeoJSON and CSV), for the documented bound (``nucleiseg/infer.py``: about 10 bytes per pixel, 2 GiB for
  10000 x 10000).

The network is a 1 x 1 convolution saved as an MLflow model (it calls dark pixels tumor nuclei), so that the
figures are those of the image-sized arrays (stain, tiling, post-processing, outputs) and a CPU run takes minutes,
not hours: a real network adds its activations for one batch of tiles (a few hundred MB for ResUNet34 at 8 x 224²),
whatever the image size. The image is a 1000 x 1000 synthetic H&E tile (``nucleiseg synth``) repeated to the size.

Run: ``python benchmarks/bench_predict_memory.py --size 12000`` (the issue's case; the whole-image reference
needs about 14 GB; ``--skip-whole`` leaves it out) or ``--size 2000`` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CASE = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
case, model, image_path = sys.argv[1:4]
from nucleiseg.infer import load_predictor, predict_classes
from nucleiseg.io import read_image
from nucleiseg.postprocess import postprocess
started = time.perf_counter()
predictor = load_predictor(model, device="cpu")
image = read_image(image_path)
s = predictor.infer
if case == "baseline":
    label = image[..., 0]
elif case == "whole":
    normalised = predictor.stain.transform(image)
    classes = predict_classes(predictor.model, normalised, predictor.mean, predictor.std, s.tile, s.overlap,
                              s.batch_size, device="cpu")
    del normalised
    label = postprocess(classes, min_area=predictor.post.min_area, radius=predictor.post.radius)
else:
    label = predictor.label(image)
print(json.dumps({"seconds": time.perf_counter() - started, "max_id": int(label.max())}))
"""


def _model(folder: Path, reference_tile: np.ndarray) -> Path:
    """The stand-in network as an MLflow model folder, with the Macenko normaliser fitted on a reference tile."""
    import mlflow.pytorch
    import torch

    from nucleiseg.stain import fit_normalizer

    model = torch.nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[1] = -5.0  # channel 1 (tumor inside) where the normalised RGB is dark
        model.bias[1] = 10.0
    metadata = {
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.25, 0.25, 0.25],
        "stain": fit_normalizer(reference_tile, "macenko").to_dict(),
        "infer": {"tile": 224, "overlap": 80, "batch_size": 8, "tta": False},  # params.yaml's
        "post": {"min_area": 20, "radius": 1},
        "mpp": 0.25,
    }
    mlflow.pytorch.save_model(model, folder, serialization_format="pickle", metadata=metadata)
    return folder


def _image(path: Path, size: int) -> Path:
    from nucleiseg.io import write_image
    from nucleiseg.synth import synth_tile

    tile = synth_tile(0, 1000)[0]
    reps = -(-size // 1000)
    write_image(path, np.tile(tile, (reps, reps, 1))[:size, :size])
    return path


def _run(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one child, through wait4 (its own rusage, not the children's maximum)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:5]))} failed:\n{proc.stderr.read()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss is in KiB on Linux


def _print(case: str, peak: float, seconds: float, baseline: float, pixels: int) -> None:
    above = (peak - baseline) * 2**20 / pixels
    print(f"  {case:9s} peak {peak:9,.0f} MiB  {peak * 2**20 / pixels:6.1f} B/px  ({above:5.1f} B/px above the "
          f"baseline)  {seconds:7.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12000, help="side of the square image, pixels")
    parser.add_argument("--skip-whole", action="store_true", help="leave out the whole-image reference")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="bench-predict-memory-") as tmp:
        work = Path(tmp)
        from nucleiseg.synth import synth_tile

        model = _model(work / "model", synth_tile(1, 512)[0])
        image = _image(work / "image.png", args.size)
        pixels = args.size * args.size
        print(f"{args.size} x {args.size} image ({pixels / 1e6:.0f} MP), Macenko, {platform.processor() or 'cpu'}, "
              f"{os.cpu_count()} cores, {args.threads} threads")  # fmt: skip
        rows = {}
        cases = ["baseline", "streamed"] + ([] if args.skip_whole else ["whole"])
        for case in cases:
            peak, seconds = _run([sys.executable, "-c", CASE, case, str(model), str(image)], env)
            rows[case] = (peak, seconds)
            _print(case, peak, seconds, rows["baseline"][0], pixels)
        command = [sys.executable, "-m", "nucleiseg", "predict", str(model), str(image), "--out", str(work / "out"),
                   "--device", "cpu", "--params", str(work / "none.yaml")]  # fmt: skip
        (work / "none.yaml").write_text("{}\n")  # the model's own settings (params.yaml's infer/post defaults)
        peak, seconds = _run(command, env)
        rows["predict"] = (peak, seconds)
        _print("predict", peak, seconds, rows["baseline"][0], pixels)
        if "whole" in rows:
            print(f"ratio streamed / whole peak memory: {rows['streamed'][0] / rows['whole'][0]:.3f}")
        print(json.dumps({k: {"peak_mib": round(v[0]), "seconds": round(v[1], 1)} for k, v in rows.items()}))


if __name__ == "__main__":
    main()
