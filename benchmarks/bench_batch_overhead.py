"""Per-call overhead of ``nucleiseg batch``: Prefect's temporary API server against no server and a running one.

The same batch (2 small synthetic tiles, a small random network, CPU) is run as a fresh command, each time into
a new output folder so that every image is computed, three ways, interleaved in each round:

ephemeral (the reference: what ``nucleiseg batch`` did before)
    the ``batch-inference`` flow called with no Prefect API configured: Prefect starts its temporary API server
    in a subprocess, runs the flow against it, and stops it, on every call.
no API (``nucleiseg batch`` now, when ``PREFECT_API_URL`` is not set)
    the same steps without Prefect (pipelines/execution.py): no server, no flow run.
running server (``nucleiseg batch`` now, with ``PREFECT_API_URL`` set, e.g. after ``make prefect-server``)
    a real flow run against a local ``prefect server start`` that this script starts once (its start time is
    printed apart: it is paid once per machine session, not per call).

All three share one ``PREFECT_HOME`` (a temporary folder), and a first, uncounted ephemeral run creates its
database, as a user's ``~/.prefect`` already exists after the first run. Printed: the median wall and CPU time of
each way (CPU: the command and the processes it waited for, so the temporary server's; not the running server's,
which serves every call) and the ratio of the reference to each.

    .venv/bin/python benchmarks/bench_batch_overhead.py [--repeats 3] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The reference: the flow itself, as `nucleiseg batch` called it before (settings from the defaults).
EPHEMERAL = """
import sys
from nucleiseg.params import load_params
from pipelines.batch_inference import batch_inference, flow_arguments
arguments = flow_arguments(load_params(None, []), sys.argv[1], sys.argv[2], sys.argv[3], device="cpu")
summary = batch_inference(**arguments)
assert summary["ok"] == summary["inputs"], summary
"""


def write_inputs(root: Path, size: int) -> tuple[Path, Path]:
    """2 synthetic tiles and a checkpoint of a small random network (the test suite's tiny model)."""
    import torch

    from nucleiseg.io import write_image
    from nucleiseg.models import create_model
    from nucleiseg.synth import synth_tile

    images = root / "images"
    for k in range(2):
        write_image(images / f"tile_{k}.png", synth_tile(k, size)[0])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights offline: expected
        model = create_model("resunet34", encoder="mobilenetv3_small_050", encoder_weights="none", dropout=0.1)
    checkpoint = root / "model.pt"
    torch.save(
        {
            "model_name": "resunet34",
            "model_kwargs": {"name": "resunet34", "encoder": "mobilenetv3_small_050", "num_classes": 5, "dropout": 0.1},
            "state_dict": model.state_dict(), "norm_mean": [0.7, 0.5, 0.7], "norm_std": [0.15, 0.2, 0.15],
            "stain": None, "infer": {"tile": 64, "overlap": 16, "batch_size": 4, "tta": False},
            "post": {"min_area": 5, "radius": 1}, "mpp": 0.25,
        },
        checkpoint,
    )  # fmt: skip
    return images, checkpoint


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of ``command``; the CPU time includes the processes it started and waited for
    (Prefect's temporary server), not a server that was already running."""
    started, cpu = time.perf_counter(), cpu_of_children()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - started, cpu_of_children() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, cpu


def start_server(env: dict[str, str], port: int, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    """``prefect server start`` on 127.0.0.1:``port``; (process, seconds until it answered)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.perf_counter() - started > 300:
            raise SystemExit(f"the Prefect server did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three ways (median reported)")
    parser.add_argument("--size", type=int, default=128, help="side of each of the 2 tiles, pixels")
    parser.add_argument("--port", type=int, default=4297, help="port of the benchmark's own Prefect server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        root = Path(tmp)
        images, checkpoint = write_inputs(root, args.size)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PREFECT_HOME": str(root / "prefect_home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        }
        for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        nucleiseg = [sys.executable, "-m", "nucleiseg", "batch", str(images)]
        options = ["--model", str(checkpoint), "--device", "cpu", "--no-progress"]
        runs = iter(range(10_000))

        def ephemeral() -> tuple[float, float]:
            out = root / f"out_{next(runs)}"
            return timed([sys.executable, "-c", EPHEMERAL, str(images), str(out), str(checkpoint)], env, root)

        def no_api() -> tuple[float, float]:
            return timed([*nucleiseg, str(root / f"out_{next(runs)}"), *options], env, root)

        print(f"2 tiles of {args.size}², tiny network, CPU; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"warm-up (creates Prefect's database, not counted): {ephemeral()[0]:.1f} s")
        server, started_in = start_server(env, args.port, root / "server.log")
        api_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{args.port}/api"}

        def running_server() -> tuple[float, float]:
            return timed([*nucleiseg, str(root / f"out_{next(runs)}"), *options], api_env, root)

        print(f"local Prefect server started once in {started_in:.1f} s")
        times: dict[str, list[tuple[float, float]]] = {"ephemeral": [], "no API": [], "running server": []}
        try:
            for round_ in range(args.repeats):
                for name, run in (("ephemeral", ephemeral), ("no API", no_api), ("running server", running_server)):
                    times[name].append(run())
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in times.items()))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        wall = {name: statistics.median(v[0] for v in values) for name, values in times.items()}
        cpu = {name: statistics.median(v[1] for v in values) for name, values in times.items()}
        print(f"\nmedians per call of `nucleiseg batch` (2 tiles), load {os.getloadavg()[0]:.1f}:")
        for name in times:
            print(
                f"  {name:15s} wall {wall[name]:6.1f} s (reference / this {wall['ephemeral'] / wall[name]:.2f}x)"
                f"   CPU {cpu[name]:6.1f} s (reference / this {cpu['ephemeral'] / cpu[name]:.2f}x)"
            )
        print(
            f"per-call overhead removed (ephemeral - no API): wall {wall['ephemeral'] - wall['no API']:.1f} s, "
            f"CPU {cpu['ephemeral'] - cpu['no API']:.1f} s"
        )


if __name__ == "__main__":
    main()
