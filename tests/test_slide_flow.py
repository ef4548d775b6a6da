"""Slides in the Prefect batch flow (real flow, temporary Prefect API, real files): a folder of a tile, a slide and
a corrupt slide; a rerun skips the finished slide; on a Dask LocalCluster of 2 worker processes the slide's chunks
give the same outputs as on the threaded runner."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nucleiseg.cli import app
from nucleiseg.io import write_image
from nucleiseg.slidegen import write_slide
from nucleiseg.synth import synth_tile

MEAN, STD = (0.7, 0.5, 0.7), (0.15, 0.2, 0.15)


def speckle_checkpoint(path: Path, image: np.ndarray) -> Path:
    """A small untrained network whose output head is shifted so that about 15% of the pixels of ``image`` come
    out as nuclei: many small, input-dependent nuclei, which any numerical difference between runs would change
    (an untrained head predicts background everywhere, and equal outputs would prove nothing)."""
    from nucleiseg.models import create_model

    torch.manual_seed(0)
    kwargs = {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resunet34", encoder=kwargs["encoder"], encoder_weights="none").eval()
    crop = image[:512, :512]  # the network takes sides divisible by 32
    x = torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x)[0]
    state = model.state_dict()
    centred = logits - logits.mean((1, 2), keepdim=True)
    state["head.proj.bias"] -= logits.mean((1, 2))
    state["head.proj.bias"][0] += torch.quantile((centred[1] - centred[0]).flatten(), 0.85)
    state["head.proj.bias"][4] -= 10.0  # no contour class
    checkpoint = {"model_name": "resunet34", "model_kwargs": kwargs, "state_dict": state, "norm_mean": list(MEAN),
                  "norm_std": list(STD), "mpp": 0.25}  # fmt: skip
    torch.save(checkpoint, path)
    return path


def run_batch(root: Path, out: Path, *extra: str) -> tuple[int, str, dict]:
    args = ["batch", str(root / "in"), str(out), "--model", str(root / "model.pt"),
            "--params", str(root / "params.yaml"), "--device", "cpu", *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    summary_path = out / "batch_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return result.exit_code, result.output, {Path(r["input"]).name: r for r in summary.get("results", [])}


def test_slides_in_the_batch_flow_and_on_a_dask_cluster(prefect_api: None, tmp_path: Path) -> None:
    tile = synth_tile(5, (600, 700))[0]
    inputs = tmp_path / "in"
    write_image(inputs / "a.png", tile[:200, :200])
    write_slide(inputs / "s.tif", tile, 0.25)
    (inputs / "junk.svs").write_bytes(b"not a slide" * 300)
    speckle_checkpoint(tmp_path / "model.pt", tile)
    (tmp_path / "params.yaml").write_text(
        "infer: {tile: 128, overlap: 32, batch_size: 4, tta: false}\npost: {min_area: 10, radius: 1}\n"
        "slide: {chunk: 250, margin_um: 20.0}\nspatial: {r_steps: 5, simulations: 2, permutations: 3}\n"
    )

    code, output, results = run_batch(tmp_path, tmp_path / "threads")
    assert code == 1, output  # the corrupt slide fails, alone
    assert results["a.png"]["status"] == "ok" and "kind" not in results["a.png"]
    slide = results["s.tif"]
    assert (slide["status"], slide["kind"], slide["chunks"]["on_tissue"]) == ("ok", "slide", 6)
    assert slide["nuclei"] > 100 and slide["nuclei"] == slide["tumor"] + slide["lymphocyte"] + slide["stroma"]
    assert (
        results["junk.svs"]["status"] == "failed" and "junk.svs: not a readable slide" in results["junk.svs"]["error"]
    )
    outputs = {k: Path(v) for k, v in slide["outputs"].items()}
    assert all(p.is_file() for p in outputs.values()) and "spatial_html" in outputs

    code, _, again = run_batch(tmp_path, tmp_path / "threads")
    assert again["s.tif"]["status"] == "skipped" and again["s.tif"]["nuclei"] == slide["nuclei"]

    code, output, on_dask = run_batch(tmp_path, tmp_path / "dask", "--runner", "dask", "--workers", "2")
    assert on_dask["s.tif"]["status"] == "ok", output
    dask_outputs = {k: Path(v) for k, v in on_dask["s.tif"]["outputs"].items()}
    pd.testing.assert_frame_equal(pd.read_parquet(dask_outputs["nuclei"]), pd.read_parquet(outputs["nuclei"]))
    with gzip.open(dask_outputs["geojson"], "rt") as a, gzip.open(outputs["geojson"], "rt") as b:
        on_workers, threaded = json.load(a)["features"], json.load(b)["features"]
    # The same nuclei, outlines and classes exactly; measurements to float rounding (a worker process runs the
    # network on another number of threads, which changes the last bits of the softmax and so of the class
    # probability).
    assert len(on_workers) == len(threaded)
    for fa, fb in zip(on_workers, threaded, strict=True):
        ma, mb = fa["properties"].pop("measurements"), fb["properties"].pop("measurements")
        assert fa == fb
        assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6) for k in ma)


def test_slides_without_a_prefect_api_on_threads_and_a_dask_cluster(tmp_path: Path) -> None:
    """No Prefect API (pipelines/execution.py): the same steps as plain calls, no flow run. On a local Dask cluster
    of 2 worker processes (each task's function sent by reference, its arguments as one dict) the tile and the
    slide's chunks give the threads' nuclei."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tile = synth_tile(5, (600, 700))[0]
    write_image(tmp_path / "in" / "a.png", tile[:200, :200])
    write_slide(tmp_path / "in" / "s.tif", tile, 0.25)
    speckle_checkpoint(tmp_path / "model.pt", tile)
    (tmp_path / "params.yaml").write_text(
        "infer: {tile: 128, overlap: 32, batch_size: 4, tta: false}\npost: {min_area: 10, radius: 1}\n"
        "slide: {chunk: 250, margin_um: 20.0}\nspatial: {r_steps: 5, simulations: 2, permutations: 3}\n"
    )
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API, whatever ran before in this session
        code, output, threads = run_batch(tmp_path, tmp_path / "threads")
        assert code == 0, output
        code, output, on_dask = run_batch(tmp_path, tmp_path / "dask", "--runner", "dask", "--workers", "2")
        assert code == 0, output
    for out in ("threads", "dask"):
        summary = json.loads((tmp_path / out / "batch_summary.json").read_text())
        assert summary["orchestrated"] is False and summary["flow_run_id"] is None
    assert threads["s.tif"]["nuclei"] > 100 and threads["s.tif"]["chunks"]["on_tissue"] == 6
    for name in ("a.png", "s.tif"):
        assert on_dask[name]["status"] == threads[name]["status"] == "ok"
        counts = ("nuclei", "tumor", "lymphocyte", "stroma")
        assert [on_dask[name][k] for k in counts] == [threads[name][k] for k in counts], name
    columns = ["id", "class", "centroid_x_px", "centroid_y_px", "area_um2"]
    tables = [pd.read_parquet(r["s.tif"]["outputs"]["nuclei"]) for r in (threads, on_dask)]
    pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns])
