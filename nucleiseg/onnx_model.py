"""The network as an ONNX model: export, its check against torch, and ONNX Runtime as an inference backend.

Definitions
-----------
ONNX model
    The trained network alone, exported with ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based
    exporter; the TorchScript one is deprecated since torch 2.9) at opset :data:`OPSET`, weights inside the
    file. One input, ``image``: a float32 batch of normalised RGB tiles ``(batch, 3, height, width)``,
    ``x = (rgb / 255 - mean) / std``; one output, ``logits``: float32 ``(batch, 5, height, width)``, the 5 maps
    of :mod:`nucleiseg.infer` before the softmax. Batch, height and width are dynamic; height and width must be
    multiples of the encoder's stride (``input_divisor``, 32 for ResNets), as for the torch model.
logits, not probabilities
    The model ends at the logits because that is what the torch network returns and what the
    :class:`nucleiseg.infer.Predictor` consumes: the softmax (in float32), the TTA average of probabilities, the
    tiling and the post-processing run after it, the same code for both backends. Other consumers apply a
    softmax over axis 1.
metadata
    What the Predictor needs besides the network, as the model's ``metadata_props`` (string pairs, values
    JSON-encoded, keys prefixed ``nucleiseg.``; ONNX Runtime shows them as ``custom_metadata_map``):
    ``norm_mean`` and ``norm_std`` (0-1 units), ``stain`` (the fitted normaliser's ``to_dict()`` or null),
    ``infer`` and ``post`` (the default settings), ``mpp``, ``input_divisor``, ``num_maps``, and for the record
    ``model_name``, ``model_kwargs``, ``source`` (the checkpoint or URI exported), ``source_identity``
    (:func:`nucleiseg.infer.model_identity`), ``torch_version``, ``nucleiseg_version``. An ``.onnx`` file with
    this metadata is a model reference of its own (:func:`nucleiseg.infer.load_predictor`).
check
    Both networks run on the same normalised tiles (synthetic H&E, :func:`nucleiseg.synth.synth_tile`, one tile
    per size, batch 1); the maximum absolute difference is taken over every logit, and over every softmax
    probability. Float32 convolutions summed in another order differ in the last bits, so the differences are
    of the order of 1e-6 of the logits' range, not zero.
backend
    ``infer.backend: onnxruntime`` runs the network's forward pass on a batch of normalised tiles through an
    ONNX Runtime ``InferenceSession`` (CPU execution provider, as many intra-op threads as torch uses,
    ``torch.get_num_threads()``); :class:`OnnxNetwork` wraps the session as a parameter-free ``torch.nn.Module``,
    so the tiling, TTA, softmax and everything after are the torch backend's own code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from nucleiseg.infer import Predictor

OPSET = 18  # torch 2.14's onnxscript translation library emits opset 18: no version conversion step
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "nucleiseg."
DEFAULT_CHECK_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (256, 256), (320, 480), (1024, 1024))


class OnnxModelError(ValueError):
    """An ONNX model cannot be exported, read or run; the message names the model and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def predictor_metadata(predictor: Predictor) -> dict[str, Any]:
    """The metadata (module docstring) of a loaded predictor's network: what a Predictor is rebuilt from."""
    from nucleiseg import __version__
    from nucleiseg.infer import model_identity

    return {
        "norm_mean": list(predictor.mean),
        "norm_std": list(predictor.std),
        "stain": None if predictor.stain is None else predictor.stain.to_dict(),
        "infer": dict(predictor.infer.__dict__),
        "post": dict(predictor.post.__dict__),
        "mpp": predictor.mpp,
        "input_divisor": int(getattr(predictor.model, "divisor", 32)),
        "model_name": predictor.info.get("model_name"),
        "model_kwargs": predictor.info.get("model_kwargs"),
        "source": predictor.source,
        "source_identity": model_identity(predictor),
        "torch_version": torch.__version__,
        "nucleiseg_version": __version__,
    }


def export_onnx(model: nn.Module, metadata: Mapping[str, Any] | None = None, divisor: int = 32) -> bytes:
    """The serialised ONNX model (module docstring) of a network mapping ``(N, 3, H, W)`` to ``(N, C, H, W)``.

    ``metadata`` values are JSON-encoded into ``metadata_props`` under ``nucleiseg.<key>``. The model is traced
    in eval mode on a contiguous copy of its weights, so the caller's module is not changed.
    """
    import copy
    import warnings

    if divisor < 1:
        raise OnnxModelError(f"input divisor must be >= 1, got {divisor}")
    network = copy.deepcopy(model).eval().to("cpu", memory_format=torch.contiguous_format)
    # Batch 2 and two strides a side: sizes 0 and 1 would be specialised by torch.export, not kept dynamic.
    example = torch.zeros(2, 3, 2 * divisor, 2 * divisor)
    dynamic = torch.export.Dim.DYNAMIC  # an error, not a silent constant, if the network fixes a size
    try:
        with warnings.catch_warnings():
            # The exporter warns about its own internals (deprecated torch.export APIs it calls); nothing to act on.
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
            program = torch.onnx.export(
                network,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types (torch.export, onnxscript)
        raise OnnxModelError(f"cannot export the network to ONNX ({type(exc).__name__}: {exc})") from None
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    # Readable names for the dynamic axes (the exporter's are symbols such as "s77"). The output's height and
    # width equal the input's for the sides this model accepts (multiples of the divisor).
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, name in ((0, "batch"), (2, "height"), (3, "width")):
            if dims[index].HasField("dim_value"):
                raise OnnxModelError(
                    f"the exported {value.name} has a fixed size {dims[index].dim_value} on axis {index}"
                )
            dims[index].dim_param = name
    proto.doc_string = (
        f"nucleiseg network: {INPUT_NAME} float32 (batch, 3, height, width), normalised RGB "
        f"(rgb / 255 - nucleiseg.norm_mean) / nucleiseg.norm_std, height and width multiples of {divisor}; "
        f"{OUTPUT_NAME} float32 (batch, maps, height, width) before the softmax"
    )
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = json.dumps(value)
    return proto.SerializeToString()


# ----------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------


class OnnxNetwork(nn.Module):
    """An ONNX model run by ONNX Runtime (CPU), called like the torch network: float32 ``(N, 3, H, W)`` tensor
    in, logits ``(N, C, H, W)`` tensor out.

    A ``nn.Module`` without parameters so that :mod:`nucleiseg.infer` runs it unchanged (``eval``, ``to``,
    ``inference_mode`` are no-ops for it). ``model``: the serialised model or an ``.onnx`` path; ``threads``:
    ONNX Runtime's intra-op threads, by default torch's (``torch.get_num_threads()``), so both backends use the
    machine alike. ``session.run`` is thread-safe: one network serves concurrent images.
    """

    def __init__(self, model: bytes | str | os.PathLike[str], threads: int | None = None, name: str = "") -> None:
        import onnxruntime as ort

        super().__init__()
        self.name = name or (os.fspath(model) if not isinstance(model, bytes) else "in-memory ONNX model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one sequential graph: the parallelism is inside the convolutions
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        source = model if isinstance(model, bytes) else os.fspath(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
            raise OnnxModelError(f"{self.name}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            raise OnnxModelError(
                f"{self.name}: expected one float32 input (N, 3, H, W) and one output, got "
                f"{[(i.name, i.type, i.shape) for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map, self.name)
        self.divisor = int(self.metadata.get("input_divisor") or 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected (N, C, H, W) with H and W divisible by {self.divisor}"
            )
        # ONNX Runtime reads a C-contiguous NCHW float32 array (the tiling hands channels_last tensors: one copy
        # of a batch of tiles, negligible against the network).
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.name}, threads={self.session.get_session_options().intra_op_num_threads}"


def read_metadata(props: Mapping[str, str], where: str) -> dict[str, Any]:
    """The ``nucleiseg.*`` entries of an ONNX model's metadata, JSON-decoded (other entries are ignored)."""
    metadata: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                metadata[key[len(METADATA_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                raise OnnxModelError(f"{where}: metadata {key} is not JSON: {value[:80]!r}") from None
    return metadata


def non_finite_initializers(path: str | os.PathLike[str]) -> list[str]:
    """Names of the ONNX model's floating-point weights that hold NaN or infinity (the torch backend refuses
    such weights on load: they predict background everywhere, a silent "0 nuclei")."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(os.fspath(path))
    broken = []
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            broken.append(tensor.name)
    return broken


def to_onnxruntime(predictor: Predictor) -> Predictor:
    """The predictor with its torch network exported (in memory, never to a file) and run by ONNX Runtime."""
    from dataclasses import replace

    if not predictor.device.startswith("cpu"):
        raise OnnxModelError(
            f"{predictor.source}: backend onnxruntime runs on the CPU (its CPU execution provider), not on "
            f"{predictor.device}; use device cpu, or backend torch"
        )
    metadata = predictor_metadata(predictor)
    model_bytes = export_onnx(predictor.model, metadata, metadata["input_divisor"])
    network = OnnxNetwork(model_bytes, name=f"{predictor.source} (exported to ONNX)")
    return replace(predictor, model=network, backend="onnxruntime")


# ----------------------------------------------------------------------------------------------------------
# The check against torch
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """Maximum absolute differences between the torch and ONNX Runtime outputs on one tile."""

    height: int
    width: int
    logits: float
    probabilities: float
    logits_range: float  # max |logit| of the torch output, the scale the logit difference compares with


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"224,256,320x480"`` as ``[(224, 224), (256, 256), (320, 480)]`` (a single number is a square)."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bad tile size {item.strip()!r}: expected N or HxW, e.g. 224 or 320x480") from None
        if len(numbers) not in (1, 2) or min(numbers) < 1:
            raise ValueError(f"bad tile size {item.strip()!r}: expected N or HxW with positive sides")
        sizes.append((numbers[0], numbers[-1]))
    return sizes


def check_against_torch(
    model: nn.Module,
    network: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    sizes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SIZES,
    seed: int = 0,
) -> list[Difference]:
    """Run ``model`` (torch) and ``network`` (e.g. :class:`OnnxNetwork`) on one synthetic H&E tile of each
    size, normalised with ``mean`` / ``std``, and return their maximum absolute differences (module docstring).
    Sides must be multiples of the network's divisor."""
    from nucleiseg.synth import synth_tile

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.inference_mode():
            for height, width in sizes:
                rgb, _ = synth_tile(seed, (height, width))
                x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean_t) / std_t
                expected = model(x).float()
                got = network(x).float()
                if got.shape != expected.shape:
                    raise OnnxModelError(
                        f"{height}x{width}: ONNX output {tuple(got.shape)}, torch {tuple(expected.shape)}"
                    )
                results.append(
                    Difference(
                        height=height,
                        width=width,
                        logits=float((got - expected).abs().max()),
                        probabilities=float((got.softmax(1) - expected.softmax(1)).abs().max()),
                        logits_range=float(expected.abs().max()),
                    )
                )
    finally:
        model.train(was_training)
    return results


__all__ = [
    "DEFAULT_CHECK_SIZES",
    "INPUT_NAME",
    "METADATA_PREFIX",
    "OPSET",
    "OUTPUT_NAME",
    "Difference",
    "OnnxModelError",
    "OnnxNetwork",
    "check_against_torch",
    "export_onnx",
    "non_finite_initializers",
    "parse_sizes",
    "predictor_metadata",
    "read_metadata",
    "to_onnxruntime",
]
