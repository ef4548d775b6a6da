"""The pyfunc model (nucleiseg/mlflow_model.py) of a small network, registered as champion in a real store.

(a) ``mlflow.pyfunc.load_model("models:/<name>@champion").predict(rgb)`` gives nucleiseg's own label; (b)
``mlflow models serve`` answers a real HTTP request on loopback with that label; (c) the saved model loads and
predicts in an isolated interpreter that sees only the model's copy of the code, its code imports only what its
requirements.txt installs, and nothing is unpickled. That training logs this model is tested in test_train.py;
the check in a fresh virtual environment is scripts/check_portable_model.sh (minutes of installing: not a test).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_checkpoint

NAME = "nucleiseg-pyfunc"


@dataclass(frozen=True)
class Registered:
    uri: str  # the tracking and registry store
    model_uri: str  # models:/<NAME>@champion
    checkpoint: Path  # the same model as a checkpoint, for nucleiseg's own Predictor
    image: np.ndarray  # a tile of the tiny synthetic dataset cropped to a size unlike the tile's (150 x 130)


@pytest.fixture(scope="module")
def registered(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registered]:
    """The small network of conftest with a fitted Macenko stain normaliser and classes by probability, logged in
    a run as training logs it (nucleiseg.mlflow_model.log_model), registered, and made champion.

    Its weights are random: a few training steps on the tiny set leave a network that predicts background
    everywhere, and an empty label would make every comparison below trivially true."""
    import mlflow
    import torch

    from nucleiseg import mlflow_model, registry, tracking
    from nucleiseg.infer import load_predictor
    from nucleiseg.io import read_image
    from nucleiseg.stain import fit_normalizer

    root = tmp_path_factory.mktemp("pyfunc_store")
    uri = f"sqlite:///{root}/mlflow.db"
    tiles = sorted(tiny_dataset.glob("*[0-9].png"))
    checkpoint = write_tiny_checkpoint(root / "model.pt", seed=1)  # a seed whose network finds nuclei in the tile
    payload = torch.load(checkpoint, weights_only=True)
    payload.update(
        stain=fit_normalizer(read_image(tiles[1]), "macenko").to_dict(),
        post={"min_area": 5, "radius": 1, "method": "paper", "classify": "probability"},
        mpp=0.25,
    )
    torch.save(payload, checkpoint)
    network = load_predictor(checkpoint, device="cpu").model
    image = read_image(tiles[0])[:150, :130]
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store must be this one, never the user's
        tracking.configure(uri, "pyfunc-tests", root / "artifacts")
        with mlflow.start_run():
            info = mlflow_model.log_model(network, payload, mlflow_model.example_crop(image))
        version = registry.register_model(
            info.model_uri, NAME, {"all": {"f1": 0.5}}, "data", "split", None, "params", tracking_uri=uri
        )
        registry.promote_version(NAME, version, reason="test", tracking_uri=uri)
        yield Registered(uri, f"models:/{NAME}@{registry.CHAMPION}", checkpoint, image)
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


@pytest.fixture()
def saved_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow prepends a loaded model's code folder to sys.path; keep it out of the other tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_pyfunc_predicts_nucleisegs_label_for_any_size_and_mpp(registered: Registered, saved_sys_path: None) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from nucleiseg.infer import load_predictor
    from nucleiseg.wsi import rescale, resize_label

    reference = load_predictor(registered.checkpoint, device="cpu")  # nucleiseg's own Predictor, same weights
    model = mlflow.pyfunc.load_model(registered.model_uri)
    rgb = registered.image
    assert rgb.shape == (150, 130, 3) and reference.infer.tile == 64  # not a multiple of the tile
    assert reference.stain is not None and reference.post.classify == "probability"  # both inside the pyfunc

    label = model.predict(rgb)
    expected = reference.label(rgb)
    assert label.dtype == np.int32 and label.shape == rgb.shape[:2]
    assert np.count_nonzero(np.unique(expected)) >= 2  # a label with nuclei, not an empty map
    np.testing.assert_array_equal(label, expected)

    # Another resolution: resampled to the model's mpp for the network, the label brought back to the image.
    coarser = model.predict(rgb, params={"mpp": 2 * reference.mpp})
    np.testing.assert_array_equal(
        coarser, resize_label(reference.label(rescale(rgb, 2 * reference.mpp, reference.mpp)), rgb.shape[:2])
    )
    np.testing.assert_array_equal(model.predict(rgb, params={"tta": True}), reference.label(rgb, tta=True))

    # The signature: one uint8 RGB image of any size in, an int32 label out; mpp and tta as params.
    signature = model.metadata.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8", "shape": (-1, -1, 3)}
    assert signature.outputs.to_dict()[0]["tensor-spec"] == {"dtype": "int32", "shape": (-1, -1)}
    assert {p.name for p in signature.params} == {"mpp", "tta"}
    with pytest.raises(MlflowException, match="shape"):
        model.predict(rgb[..., 0])  # a grey image is refused by the signature, not segmented as garbage
    with pytest.raises(ValueError, match="mpp must be a positive number"):
        model.predict(rgb, params={"mpp": 0.0})


def test_the_model_holds_no_pickle_and_loads_without_one(registered: Registered, tmp_path: Path) -> None:
    import warnings

    import mlflow.artifacts
    import torch
    from mlflow.models import Model
    from safetensors.torch import load_file

    from nucleiseg.infer import PickledModelWarning, load_predictor, model_identity

    folder = Path(mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path)))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"artifacts/weights.safetensors", "artifacts/config.json", "model_code.py", "requirements.txt"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    conf = Model.load(folder / "MLmodel").flavors["python_function"]
    assert "python_model" not in conf and conf["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (folder / "input_example.json").stat().st_size < 100_000  # a small real crop, not megabytes of zeros

    with warnings.catch_warnings():
        warnings.simplefilter("error", PickledModelWarning)  # the old format's warning would fail here
        predictor = load_predictor(registered.model_uri, device="cpu")
    weights = load_file(folder / "artifacts" / "weights.safetensors")
    best = torch.load(registered.checkpoint, weights_only=True)["state_dict"]
    assert weights.keys() == best.keys() and all(torch.equal(weights[k], best[k]) for k in best)
    assert model_identity(predictor).startswith("mlflow:")
    np.testing.assert_array_equal(
        predictor.label(registered.image), load_predictor(registered.checkpoint, device="cpu").label(registered.image)
    )


# Run in `python -I` from an empty folder, with the editable install of nucleiseg removed: it loads the model,
# predicts, and reports what it imported, and what the model's nucleiseg modules import (their import statements
# whose module was loaded). An audit hook fails any unpickling (pickle.find_class is raised whenever a pickle names
# a class or function).
_ISOLATED = r"""
import ast, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
def no_pickle(event, args):
    if event == "pickle.find_class":
        raise RuntimeError(f"unpickled {args}")
sys.addaudithook(no_pickle)
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
image = np.asarray(json.load(open(sys.argv[2])), dtype=np.uint8)
label = model.predict(image)
import nucleiseg
imports = set()
for name, module in list(sys.modules.items()):
    if name.split(".")[0] == "nucleiseg" and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.Import):
                imports.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imports.add(node.module.split(".")[0])
print(json.dumps({
    "nucleiseg": nucleiseg.__file__,
    "label": label.tolist(),
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "nucleiseg_imports": sorted(m for m in imports if m in sys.modules and m not in sys.stdlib_module_names),
}))
"""


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install: the named ones and, recursively, their own requirements."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_model_runs_isolated_on_its_own_code_and_requirements(registered: Registered, tmp_path: Path) -> None:
    from importlib.metadata import packages_distributions

    import mlflow.artifacts
    from packaging.utils import canonicalize_name

    from nucleiseg.infer import load_predictor

    folder = Path(mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path / "model")))
    (tmp_path / "image.json").write_text(json.dumps(registered.image.tolist()))
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    done = subprocess.run(
        [sys.executable, "-I", "-c", _ISOLATED, str(folder), str(tmp_path / "image.json")],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(report["nucleiseg"]).is_relative_to(folder / "code")  # the model's copy of the code, not the repo
    expected = load_predictor(registered.checkpoint, device="cpu").label(registered.image)
    np.testing.assert_array_equal(np.asarray(report["label"]), expected)
    assert not list(empty.iterdir())  # nothing written into the working directory

    # Every distribution that the model's code imports is installed by its requirements.txt (directly, or as a
    # requirement of one: huggingface_hub comes with timm); the orchestration stack is not imported at all.
    requirements = [r for r in (folder / "requirements.txt").read_text().split() if r and not r.startswith("-")]
    owners = packages_distributions()
    needed = {canonicalize_name(d) for m in report["nucleiseg_imports"] for d in owners.get(m, [])} - {"nucleiseg"}
    assert {"torch", "timm", "numpy", "scipy", "safetensors"} <= needed  # the check sees the imports it should
    assert needed <= _closure(requirements), f"imported but not required: {sorted(needed - _closure(requirements))}"
    assert not set(report["modules"]) & {"prefect", "dvc", "great_expectations", "optuna", "nucleiseg.train"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_a_request_with_the_label(registered: Registered, tmp_path: Path) -> None:
    from nucleiseg.infer import load_predictor

    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # As from an activated environment: the CLI runs `uvicorn` from PATH.
    path = os.pathsep.join([str(mlflow_cli.parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": registered.uri, "MLFLOW_REGISTRY_URI": registered.uri}
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", registered.model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
        start_new_session=True,  # its own process group: the uvicorn workers stop with it
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping in 240 s"
            time.sleep(1)
        rgb = registered.image[:70, :90]
        body = json.dumps({"inputs": rgb.tolist(), "params": {"tta": False}}).encode()
        request = urllib.request.Request(
            f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        label = np.asarray(answer["predictions"])
        assert label.shape == rgb.shape[:2]
        np.testing.assert_array_equal(label, load_predictor(registered.checkpoint, device="cpu").label(rgb))
    finally:
        stopped = _stop_group(server)
    assert stopped, "the server's processes did not end within 30 s of SIGTERM"
    with pytest.raises(OSError):  # stopped: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _stop_group(process: subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGTERM to the process group this test started (the CLI and the uvicorn server it runs); True when every
    process of the group has ended within ``timeout`` (uvicorn finishes its graceful shutdown after the CLI
    exits), else SIGKILL them and return False."""
    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()  # reap the CLI once it exits, so that it does not linger in the group as a zombie
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return False
