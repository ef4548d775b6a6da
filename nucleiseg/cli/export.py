"""``nucleiseg export``: a trained model in another format (``export onnx``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nucleiseg.cli.app import ForceOption, ParamsOption, SetOption, app, fail, read_params, use_model_store

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_SIZES = "224,256,320x480,1024"
DEFAULT_TOLERANCE = 1e-4

export_app = typer.Typer(help="Write a trained model in another format (onnx).", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_command(
    model: Annotated[
        str,
        typer.Argument(help="Checkpoint file (.pt) or MLflow model URI, e.g. models:/nucleiseg@champion."),
    ],
    out: Annotated[Path, typer.Argument(help="The ONNX file to write (.onnx).")],
    sizes: Annotated[
        str,
        typer.Option("--sizes", help="Tiles the export is checked on, against torch: N or HxW, comma-separated."),
    ] = DEFAULT_SIZES,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, help="Largest accepted |difference| of a softmax probability."),
    ] = DEFAULT_TOLERANCE,
    params: ParamsOption = DEFAULT_PARAMS,
    set_: SetOption = None,
    force: ForceOption = False,
) -> None:
    """Export the network to ONNX (opset 18; dynamic batch, height and width), checked against torch.

    Input "image": a float32 batch of normalised RGB tiles (batch, 3, height, width), sides multiples of 32.

    Output "logits": (batch, 5, height, width), before the softmax (over axis 1) that gives the probabilities.

    Its metadata (norm_mean, norm_std, stain, infer, post, mpp, ...) makes the file a model: nucleiseg predict OUT.onnx.

    Before writing, torch and ONNX Runtime run a synthetic H&E tile of each size (--sizes); the differences are printed.

    Nothing is written (exit 1) when a probability differs by more than --tolerance.
    """
    from nucleiseg.infer import ModelLoadError, is_mlflow_uri, load_predictor
    from nucleiseg.io import write_bytes_atomic
    from nucleiseg.onnx_model import (
        OPSET,
        OnnxModelError,
        OnnxNetwork,
        check_against_torch,
        export_onnx,
        parse_sizes,
        predictor_metadata,
    )
    from nucleiseg.outputs import OutputError, claim_file, record_files

    if out.suffix.lower() != ".onnx":
        fail(f"{out}: the output must be an .onnx file (the suffix tells a model reference what it is)", code=2)
        return
    in_project = params != DEFAULT_PARAMS or params.is_file()
    settings = read_params(params if in_project else None, set_)
    try:
        tiles = parse_sizes(sizes)
    except ValueError as exc:
        fail(f"--sizes: {exc}", code=2)
        return
    inputs = [Path(model)] if not is_mlflow_uri(model) else []
    try:
        claim_file(out, inputs, force)
    except OutputError as exc:
        fail(str(exc))
        return
    if is_mlflow_uri(model):
        use_model_store(settings, in_project)
    try:
        predictor = load_predictor(model, device="cpu")
    except ModelLoadError as exc:
        fail(str(exc))
        return
    if predictor.backend != "torch":
        fail(f"{model}: already an ONNX model")
        return
    metadata = predictor_metadata(predictor)
    divisor = metadata["input_divisor"]
    bad = [f"{h}x{w}" for h, w in tiles if h % divisor or w % divisor]
    if bad:
        fail(f"--sizes: {', '.join(bad)}: sides must be multiples of {divisor}", code=2)
        return
    typer.echo(f"exporting {model} to ONNX (opset {OPSET}, torch.export-based exporter) ...")
    try:
        data = export_onnx(predictor.model, metadata, divisor)
        network = OnnxNetwork(data, name=str(out))
        differences = check_against_torch(predictor.model, network, predictor.mean, predictor.std, tiles)
    except OnnxModelError as exc:
        fail(str(exc))
        return
    typer.echo("check against torch (one synthetic H&E tile per size, batch 1, float32):")
    typer.echo(f"  {'tile':>10}  {'max |logit diff|':>16}  {'max |logit|':>11}  {'max |prob diff|':>15}")
    for d in differences:
        tile = f"{d.height}x{d.width}"
        typer.echo(f"  {tile:>10}  {d.logits:16.2e}  {d.logits_range:11.2f}  {d.probabilities:15.2e}")
    worst = max(d.probabilities for d in differences)
    if worst > tolerance:
        fail(f"ONNX Runtime and torch differ by {worst:.2e} in a probability, more than --tolerance {tolerance:g}")
        return
    write_bytes_atomic(out, data)
    record_files(out.parent, [out])
    typer.echo(
        f"wrote {out} ({len(data) / 1e6:.1f} MB): input image float32 (batch, 3, height, width), normalised RGB, "
        f"sides multiples of {divisor}; output logits (batch, 5, height, width); max |prob diff| {worst:.2e} "
        f"<= {tolerance:g}"
    )
