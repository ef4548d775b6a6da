"""Pretrained weights: where they come from, and what happens when they cannot be had.

A weights request is one string: ``"imagenet"`` (the published ImageNet weights), ``"none"`` (random
initialisation) or the path of a local checkpoint file (a timm / torchvision ``state_dict``, optionally
wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``).

``imagenet`` is resolved without waiting on the network: a copy already in the Hugging Face cache or in
the torch hub cache is used directly; otherwise, unless ``HF_HUB_OFFLINE`` is set, the host is probed with a
short timeout before anything is downloaded. When the weights cannot be had the model keeps its random
initialisation, one :class:`PretrainedWeightsWarning` says so, and the returned :class:`WeightsInfo` has
``pretrained=False`` so that the run records it: a missing download never crashes a run and is never
passed off as pretrained. A local path that cannot be read or does not fit the model is an error (the
user asked for that file), reported with the file's name.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET = "imagenet"
NO_WEIGHTS = "none"
PROBE_TIMEOUT_S = 3.0

# torchvision's VGG16 ImageNet weights; timm hosts the same tensors as ``timm/vgg16.tv_in1k``.
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_HF_HUB_ID = "timm/vgg16.tv_in1k"
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were requested but could not be obtained; the model is randomly initialised."""


class WeightsError(ValueError):
    """A local weights file is missing, unreadable or does not fit the model. The message names the file."""


@dataclass(frozen=True)
class WeightsInfo:
    """What a module was initialised with: ``requested`` as given, ``pretrained`` whether it really got
    pretrained tensors, and ``source`` in words (the file, or why it fell back to random init)."""

    requested: str
    pretrained: bool
    source: str

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}{key}": value for key, value in asdict(self).items()}


def is_offline() -> bool:
    """True when the Hugging Face offline switch is on (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``):
    nothing is downloaded, only caches are used."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def is_local_path(weights: str) -> bool:
    """Whether a weights request names a file rather than ``imagenet`` / ``none``."""
    return weights.strip().lower() not in {IMAGENET, NO_WEIGHTS}


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) and return its tensors, unwrapped from ``state_dict``/``model`` and DDP prefixes."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"weights file not found: {file}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(file), device="cpu")
        else:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files; name the file either way
        raise WeightsError(f"cannot read weights file {file}: {exc}") from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"weights file {file} does not hold a state dict of tensors")
    return {_strip_wrappers(key): value for key, value in checkpoint.items()}


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor], file: str | os.PathLike[str]) -> None:
    """Load ``state_dict`` into ``module``, requiring every parameter and buffer of ``module`` to be present
    with its shape. Extra keys (a classifier, a decoder) are ignored, and the keys may share a leading
    prefix (``encoder.model.`` in a whole nucleiseg model, ``features.`` in a VGG, ``backbone.`` ...)."""
    wanted = {k: v.shape for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not wanted:
        return
    probe = next(iter(wanted))
    prefixes = ["", *sorted({k[: -len(probe)] for k in state_dict if k.endswith("." + probe)}, key=len)]
    best_missing: list[str] = list(wanted)
    for prefix in prefixes:
        missing = [
            k for k, shape in wanted.items() if prefix + k not in state_dict or state_dict[prefix + k].shape != shape
        ]
        if not missing:
            module.load_state_dict({k: state_dict[prefix + k] for k in wanted}, strict=False)
            return
        if len(missing) < len(best_missing):
            best_missing = missing
    shown = ", ".join(best_missing[:5]) + (" ..." if len(best_missing) > 5 else "")
    raise WeightsError(
        f"weights file {file} does not fit {type(module).__name__}: {len(best_missing)} of {len(wanted)} tensors "
        f"missing or of another shape ({shown})"
    )


def _hf_cached(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in _HF_FILENAMES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _torch_hub_cached(url: str) -> Path | None:
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return candidate if candidate.is_file() else None


def _reachable(url: str) -> bool:
    """A HEAD request with a short timeout: any HTTP answer means the host is reachable."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def find_imagenet_file(hf_hub_id: str | None, url: str | None) -> tuple[Path | None, str]:
    """Locate (and if possible download) a published weights file, quickly.

    Order: the Hugging Face cache, the torch hub cache, then, when not offline and the host answers a probe,
    a download into those caches. Returns ``(path, where)``, or ``(None, why not)``."""
    if hf_hub_id:
        hit = _hf_cached(hf_hub_id)
        if hit is not None:
            return hit, f"Hugging Face cache ({hf_hub_id})"
    if url:
        hit = _torch_hub_cached(url)
        if hit is not None:
            return hit, f"torch hub cache ({url})"
    if is_offline():
        return None, "not in the local caches and HF_HUB_OFFLINE is set"
    errors: list[str] = []
    if hf_hub_id:
        from huggingface_hub import constants, hf_hub_download

        probe = f"{constants.ENDPOINT}/{hf_hub_id}/resolve/main/{_HF_FILENAMES[0]}"
        if _reachable(probe):
            for filename in _HF_FILENAMES:
                try:
                    return Path(hf_hub_download(hf_hub_id, filename)), f"Hugging Face hub ({hf_hub_id})"
                except Exception as exc:  # missing file variant, HTTP error: try the next source
                    errors.append(f"{hf_hub_id}/{filename}: {exc}")
        else:
            errors.append(f"{constants.ENDPOINT} unreachable")
    if url:
        if _reachable(url):
            target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(target), progress=False)
                return target, f"download ({url})"
            except Exception as exc:
                errors.append(f"{url}: {exc}")
        else:
            errors.append(f"{url} unreachable")
    return None, "; ".join(errors) or "no source known for these weights"


def warn_random_init(what: str, reason: str) -> None:
    """The one warning issued when requested ImageNet weights cannot be had."""
    warnings.warn(
        f"ImageNet weights for {what} are unavailable ({reason}); using random initialisation. "
        "This run is recorded with pretrained=false.",
        PretrainedWeightsWarning,
        stacklevel=3,
    )


def create_timm_model(name: str, weights: str, **kwargs: Any) -> tuple[nn.Module, WeightsInfo]:
    """``timm.create_model(name, **kwargs)`` with ``weights`` resolved as described in this module.

    ``name`` may carry a pretrained tag (``resnet34.tv_in1k``); ``kwargs`` go to timm (``features_only=True``,
    ``out_indices``...)."""
    import timm

    weights = str(weights)
    if weights.strip().lower() == NO_WEIGHTS:
        return timm.create_model(name, pretrained=False, **kwargs), WeightsInfo(weights, False, "random init")
    if is_local_path(weights):
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_matching(model, read_state_dict(weights), weights)
        return model, WeightsInfo(weights, True, f"file {Path(weights).expanduser()}")

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm knows no pretrained weights for {name!r}")
    file, where = find_imagenet_file(cfg.hf_hub_id, cfg.url)
    if file is None:
        warn_random_init(f"timm model {name!r}", where)
        return timm.create_model(name, pretrained=False, **kwargs), WeightsInfo(weights, False, f"random init: {where}")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
    return model, WeightsInfo(weights, True, f"{where}: {file}")


def vgg16_state_dict(weights: str) -> tuple[dict[str, torch.Tensor] | None, WeightsInfo]:
    """The state dict of torchvision's ``vgg16`` (keys ``features.N.*``, ``classifier.N.*``) for a weights
    request, or ``None`` for random init. timm-format checkpoints (``pre_logits.fc1`` ...) are converted."""
    weights = str(weights)
    if weights.strip().lower() == NO_WEIGHTS:
        return None, WeightsInfo(weights, False, "random init")
    if is_local_path(weights):
        return _as_torchvision_vgg(read_state_dict(weights)), WeightsInfo(
            weights, True, f"file {Path(weights).expanduser()}"
        )
    file, where = find_imagenet_file(VGG16_HF_HUB_ID, VGG16_URL)
    if file is None:
        warn_random_init("VGG16", where)
        return None, WeightsInfo(weights, False, f"random init: {where}")
    return _as_torchvision_vgg(read_state_dict(file)), WeightsInfo(weights, True, f"{where}: {file}")


def _as_torchvision_vgg(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                if key.endswith("weight") and value.ndim == 4:  # timm stores fc6/fc7 as convolutions
                    value = value.flatten(1)
        out[key] = value
    return out
