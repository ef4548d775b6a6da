"""Screenshots of the MLflow UI over a tracking store, taken by headless Chromium, and what the UI's API serves.

Starts ``mlflow server`` on a free loopback port over STORE (``mlruns/mlflow.db``, or any tracking URI), checks
through the REST API the UI itself reads (``/ajax-api/2.0/mlflow/...``) that the run has grouped metric names
(``train/loss``, ``val/f1``, ``test/all/f1``), its datasets (contexts training, validation, test) and the experiment
its model-training kind, prints those facts as JSON (``--checks FILE`` also writes them), photographs the pages
with ``chromium --headless`` (1600x1000) and stops the server. The pages open in MLflow's model-training view
(``?workflowType=machine_learning``; see nucleiseg.tracking.ui_url).

    python scripts/screenshot_mlflow.py mlruns/mlflow.db --out docs/          # the latest run of `nucleiseg`
    python scripts/screenshot_mlflow.py mlruns/mlflow.db --run RUN_ID --pages run,model --out docs/

Pages (``--pages``, comma-separated): ``experiment`` (the runs table: runs side by side with their datasets and
models), ``run`` (overview: datasets, tags, the metrics table by name, the logged model), ``model`` (the logged
model: its datasets, its metrics with the dataset each was measured on). Files: ``OUT/mlflow_<page>.png``. The
chart tabs are not photographed: their plots draw in real time, which headless Chromium's virtual clock does not
wait for. Needs Debian's ``chromium``; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PAGES = ("experiment", "run", "model")


def _store_uri(store: str) -> str:
    if "://" in store:
        return store
    path = Path(store).resolve()
    if not path.is_file():
        sys.exit(f"{store}: no such tracking database (give mlruns/mlflow.db or a tracking URI)")
    return f"sqlite:///{path}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/{path}", timeout=timeout) as response:
        return json.load(response)


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited with {server.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    sys.exit(f"mlflow server at {base} did not answer /health within {timeout:.0f} s")


def _facts(base: str, experiment_name: str, run_id: str | None) -> dict:
    """What the UI will draw, read from the same API: experiment kind, the run's metrics, datasets, model."""
    if run_id is None:
        experiment = _get(base, f"experiments/get-by-name?experiment_name={experiment_name}")["experiment"]
        query = {
            "experiment_ids": [experiment["experiment_id"]],
            "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
            "filter": "tags.`mlflow.parentRunId` IS NULL",  # a study's trials are nested; the training runs are not
        }
        request = urllib.request.Request(
            f"{base}/ajax-api/2.0/mlflow/runs/search",
            data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.load(response).get("runs", [])
        if not runs:
            sys.exit(f"experiment {experiment_name!r} has no run")
        run_id = runs[0]["info"]["run_id"]
    run = _get(base, f"runs/get?run_id={run_id}")["run"]
    experiment_id = run["info"]["experiment_id"]
    experiment = _get(base, f"experiments/get?experiment_id={experiment_id}")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    inputs = run.get("inputs", {})
    datasets = {
        next((t["value"] for t in i.get("tags", []) if t["key"] == "mlflow.data.context"), "none"): i["dataset"]
        for i in inputs.get("dataset_inputs", [])
    }
    model_ids = [o["model_id"] for o in run.get("outputs", {}).get("model_outputs", [])]
    model_metrics: list[str] = []
    if model_ids:
        model = _get(base, f"logged-models/{model_ids[0]}")["model"]
        model_metrics = sorted({m["key"] for m in model.get("data", {}).get("metrics", [])})
    return {
        "experiment_id": experiment_id,
        "experiment_kind": tags.get("mlflow.experimentKind"),
        "run_id": run_id,
        "run_metrics": sorted(m["key"] for m in run["data"].get("metrics", [])),
        "datasets": {c: {k: d.get(k) for k in ("name", "digest", "source_type")} for c, d in datasets.items()},
        "model_id": model_ids[0] if model_ids else None,
        "model_metrics": model_metrics,
    }


def _page_url(base: str, page: str, facts: dict) -> str | None:
    experiment, run = facts["experiment_id"], facts["run_id"]
    route = {
        "experiment": f"experiments/{experiment}/runs",
        "run": f"experiments/{experiment}/runs/{run}",
        "model": f"experiments/{experiment}/models/{facts['model_id']}" if facts["model_id"] else None,
    }[page]
    if route is None:
        return None
    return f"{base}/#/{route}?workflowType=machine_learning"


def _screenshot(url: str, path: Path, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no remembered UI state
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={profile}", f"--screenshot={path}", "--window-size=1600,1000",
             f"--virtual-time-budget={budget_ms}", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="the tracking database (mlruns/mlflow.db) or a tracking URI")
    parser.add_argument("--run", help="run id (default: the latest top-level run of --experiment)")
    parser.add_argument("--experiment", default="nucleiseg", help="experiment name (default: nucleiseg)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs and the checks")
    parser.add_argument("--pages", default="experiment,run,model", help=f"comma-separated, of {', '.join(PAGES)}")
    parser.add_argument("--checks", type=Path, help="also write what the UI's API serves to this JSON file")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time per page")
    args = parser.parse_args(argv)
    pages = [p for p in args.pages.split(",") if p]
    if unknown := [p for p in pages if p not in PAGES]:
        parser.error(f"unknown page(s) {', '.join(unknown)}; choose from {', '.join(PAGES)}")

    uri, port = _store_uri(args.store), _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_healthy(base, server, timeout=120)
        facts = _facts(base, args.experiment, args.run)
        print(json.dumps(facts, indent=2))
        if args.checks is not None:
            args.checks.write_text(json.dumps(facts, indent=2) + "\n")
        args.out.mkdir(parents=True, exist_ok=True)
        for page in pages:
            url = _page_url(base, page, facts)
            if url is None:
                print(f"{page}: skipped (the run logged no model)")
                continue
            path = args.out / f"mlflow_{page}.png"
            _screenshot(url, path, args.budget_ms)
            print(f"{page}: {path} <- {url}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker, which we started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
