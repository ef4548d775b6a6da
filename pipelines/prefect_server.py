"""A local Prefect server for the long-running services (``nucleiseg serve-retrain``), started and stopped with them.

Why not Prefect's ephemeral API: it starts in a subprocess of whichever process first needs it and runs only
the services marked for ephemeral use. In Prefect 3.9 those include the event triggers and their actions but not
the scheduler (``prefect.server.services.scheduler`` is not ``run_in_ephemeral``; the runner warns "Cannot
schedule flows on an ephemeral server"), so a served deployment's cron schedule would never create a run. A
served deployment with both an event trigger and a cron schedule needs a real server: the one at
``PREFECT_API_URL`` when it is set, else the one :func:`local_prefect_server` starts.

The server is a child process in its own process group (``prefect server start`` runs uvicorn in-process), so
that stopping it stops all of it; it is stopped with SIGTERM, then SIGKILL after ``stop_timeout_s``. Its
database is Prefect's usual one under ``PREFECT_HOME`` (``~/.prefect``), so the runs stay visible in its UI
after a restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class PrefectServerError(RuntimeError):
    """The local Prefect server did not start; the message holds the end of its log."""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def server_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the process group ``proc`` leads, then SIGKILL when it has not ended after ``timeout_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def local_prefect_server(
    host: str = "127.0.0.1",
    port: int = 4200,
    log_path: str | os.PathLike[str] | None = None,
    startup_timeout_s: float = 120.0,
    stop_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Start ``prefect server start`` on ``host:port`` and yield its API URL once it answers; stop it on exit.

    A server already answering on that port is used as it is (and left running); a port taken by something
    else is an error. ``log_path`` receives the server's output (default: discarded).
    """
    api_url = f"http://{host}:{port}/api"
    if port_in_use(host, port):
        if server_healthy(api_url):
            yield api_url
            return
        raise PrefectServerError(f"port {port} on {host} is taken by something that is not a Prefect server")
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # closed in the finally below
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)  # the server itself serves the API; it must not look for another
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: stopped as a whole, and not by a Ctrl-C meant for us
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server_healthy(api_url):
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
                raise PrefectServerError(f"`prefect server start` exited with code {proc.returncode}\n{tail}")
            if time.monotonic() > deadline:
                raise PrefectServerError(f"the Prefect server on {host}:{port} did not answer in {startup_timeout_s}s")
            time.sleep(0.5)
        yield api_url
    finally:
        stop_process_group(proc, stop_timeout_s)
        if log is not subprocess.DEVNULL:
            log.close()


__all__ = ["PrefectServerError", "local_prefect_server", "server_healthy", "stop_process_group"]
