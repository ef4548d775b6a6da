"""The annotations inbox: scanning, merging, the watcher's debounce, refused sets, and the whole service.

Real parts throughout: real files, a real DVC repository, the real flow on a Prefect API, a real watchdog
observer, and `nucleiseg serve-retrain` as a subprocess with its own Prefect server, stopped by SIGINT. The
retraining itself (dvc repro, the gate) is tested on a trained repository in tests/test_retrain.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from nucleiseg import inbox as inbox_lib
from nucleiseg.io import read_image, write_image
from nucleiseg.labels import read_label, write_label
from nucleiseg.synth import write_dataset
from nucleiseg.tracking import dataset_hash

QUIET_S = 0.5


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A DVC repository whose ``data/`` (3 synthetic 128x128 tiles) is versioned by ``data.dvc``."""
    root = tmp_path_factory.mktemp("inbox") / "repo"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = "data"
    params["schedule"]["inbox_quiet_s"] = QUIET_S
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "class_map.yaml").write_text((REPO / "class_map.yaml").read_text())
    write_dataset(root / "data", 3, 128, seed=0)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"], ["git", "add", "-A"]):
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    subprocess.run([*git, "commit", "-qm", "data"], cwd=root, env=env, check=True, capture_output=True)
    return root, env


def test_scan_groups_the_inbox_into_submissions(tmp_path):
    data, inbox = tmp_path / "data", tmp_path / "inbox"
    write_dataset(data, 1, 64, seed=0)  # synth_000 is in the dataset
    write_dataset(tmp_path / "new", 2, 64, seed=1, prefix="new")
    for name in ("new_000.png", "new_000_label.png", "new_001.png"):
        inbox.mkdir(exist_ok=True)
        (inbox / name).write_bytes((tmp_path / "new" / name).read_bytes())
    (inbox / "synth_000.geojson").write_text('{"type": "FeatureCollection", "features": []}')  # image in data/
    (inbox / "lost.geojson.gz").write_bytes(b"")  # no image anywhere yet
    (inbox / "twice.png").write_bytes((tmp_path / "new" / "new_001.png").read_bytes())
    (inbox / "twice.geojson").write_text("{}")
    (inbox / "twice_label.png").write_bytes((tmp_path / "new" / "new_000_label.png").read_bytes())
    (inbox / "notes.txt").write_text("for the record")
    (inbox / ".partial.png").write_bytes(b"")  # hidden: a copy in progress
    (inbox / inbox_lib.DONE).mkdir()

    scan = inbox_lib.scan_inbox(inbox, data)
    kinds = {s.name: (s.kind, s.image and s.image.name, s.annotation.name) for s in scan.submissions}
    assert kinds == {
        "new_000": ("labels", "new_000.png", "new_000_label.png"),
        "synth_000": ("qupath", None, "synth_000.geojson"),
    }
    assert sorted(scan.waiting) == ["lost.geojson.gz", "new_001.png"]
    assert scan.unrecognised == ["notes.txt"]
    ((files, message),) = scan.errors
    assert sorted(p.name for p in files) == ["twice.geojson", "twice.png", "twice_label.png"]
    assert "2 annotations of one tile" in message and "twice" in message
    assert ".partial.png" not in scan.digests


def test_merge_replaces_a_tile_as_a_whole_and_keeps_the_previous_files(tmp_path):
    data, staging, replaced = tmp_path / "data", tmp_path / "staging", tmp_path / "replaced"
    write_dataset(data, 2, 64, seed=0)
    old_label = (data / "synth_000_label.png").read_bytes()
    write_label(data / "synth_000_other.png", np.pad(np.ones((4, 4), np.int32), ((0, 60), (0, 60))))
    new_label = read_label(data / "synth_000_label.png")
    new_label[new_label == new_label.max()] = 0  # the correction: one nucleus deleted
    write_label(staging / "synth_000_label.png", new_label)
    write_image(staging / "synth_000.png", read_image(data / "synth_000.png"))
    write_dataset(staging, 1, 64, seed=5, prefix="extra")
    tiles = [
        inbox_lib.StagedTile("synth_000", "labels", ["synth_000_label.png", "synth_000.png"], [], False, True),
        inbox_lib.StagedTile("extra_000", "labels", ["extra_000_label.png", "extra_000.png"], [], False, False),
    ]
    candidate = inbox_lib.build_candidate(data, staging, tiles, tmp_path / "candidate")
    outcome = inbox_lib.merge_staged(data, staging, tiles, replaced)

    assert outcome == {"added": ["extra_000"], "replaced": ["synth_000"], "removed": ["synth_000_other.png"]}
    assert np.array_equal(read_label(data / "synth_000_label.png"), new_label)
    assert not (data / "synth_000_other.png").exists()  # the earlier version's ignore map went with it
    assert (replaced / "synth_000_label.png").read_bytes() == old_label
    assert sorted(p.name for p in replaced.iterdir()) == ["synth_000.png", "synth_000_label.png", "synth_000_other.png"]
    assert dataset_hash(candidate) == dataset_hash(data)  # what was validated is what was merged


def test_watcher_makes_one_announcement_per_burst(tmp_path):
    from pipelines.inbox_watch import InboxWatcher

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "waiting.png").write_bytes(b"dropped while nothing watched")
    announced: list[list[str]] = []
    with InboxWatcher(inbox, announced.append, QUIET_S):
        _wait_for(lambda: len(announced) == 1, 10, "the files already waiting")
        for i in range(3):  # a burst: gaps shorter than the quiet period
            (inbox / f"tile_{i}.png").write_bytes(b"x" * 1000)
            time.sleep(QUIET_S / 5)
        _wait_for(lambda: len(announced) == 2, 10, "the burst")
        # what the flow itself does must not announce anything: archive moves, hidden files, locks
        done = inbox / ".done" / "run"
        done.mkdir(parents=True)
        os.replace(inbox / "tile_0.png", done / "tile_0.png")
        (inbox / ".lock").write_text("")
        (inbox / "tile_1.png").unlink()
        time.sleep(4 * QUIET_S)
    assert announced == [["waiting.png"], ["tile_0.png", "tile_1.png", "tile_2.png"]]


def _broken_geojson(inbox: Path, data: Path) -> str:
    (inbox / "broken.png").write_bytes((data / "synth_000.png").read_bytes())
    (inbox / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    return "broken.geojson"


def _label_of_the_wrong_size(inbox: Path, data: Path) -> str:
    (inbox / "small.png").write_bytes((data / "synth_000.png").read_bytes())
    label = np.zeros((64, 64), np.int32)
    label[10:20, 10:20] = 3
    write_label(inbox / "small_label.png", label)
    return "small_label.png"


@pytest.mark.parametrize("drop", [_broken_geojson, _label_of_the_wrong_size], ids=["malformed-geojson", "label-size"])
def test_a_broken_file_is_refused_and_nothing_is_merged(small_repo, prefect_api, drop, monkeypatch):
    from pipelines.retrain import retrain_on_new_annotations

    root, _ = small_repo
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    inbox, data = root / "inbox", root / "data"
    inbox.mkdir(exist_ok=True)
    data_before, dvc_before = dataset_hash(data), (root / "data.dvc").read_bytes()
    culprit = drop(inbox, data)
    landed = sorted(p.name for p in inbox.iterdir() if p.is_file())

    summary = retrain_on_new_annotations(repo_dir=str(root), trigger="test")

    assert summary["action"] == "refused" and summary["trigger"] == "test", summary
    intake = summary["inbox"]
    assert culprit in summary["message"] and culprit in intake["reason"]
    assert sorted(intake["refused_files"]) == landed == sorted(intake["landed"])
    refused = Path(intake["archive"])
    assert refused.parent == inbox / inbox_lib.REFUSED
    assert sorted(p.name for p in refused.iterdir()) == sorted([*landed, "REASON.txt", "record.json"])
    assert culprit in (refused / "REASON.txt").read_text()
    assert not [p for p in inbox.iterdir() if p.is_file()]  # nothing left to be taken in again
    assert dataset_hash(data) == data_before and (root / "data.dvc").read_bytes() == dvc_before
    assert not (inbox / inbox_lib.DONE).exists()


def test_a_run_beside_a_running_one_stops_at_once_and_touches_nothing(small_repo, prefect_api):
    import filelock

    from pipelines.retrain import LOCK_NAME, WORK_DIR, RetrainError, retrain_on_new_annotations

    root, _ = small_repo
    inbox = root / "inbox"
    (inbox / WORK_DIR).mkdir(parents=True, exist_ok=True)
    culprit = _broken_geojson(inbox, root / "data")
    try:
        with filelock.FileLock(inbox / WORK_DIR / LOCK_NAME, timeout=0):  # a run in progress (another process)
            with pytest.raises(RetrainError, match="another retraining run holds"):
                retrain_on_new_annotations(repo_dir=str(root), trigger="test")
        assert (inbox / culprit).is_file()  # left for the run that holds the lock
    finally:
        for name in ("broken.png", "broken.geojson"):
            (inbox / name).unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_processes(sid: int) -> list[int]:
    """Processes of session ``sid`` still alive (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _server_processes(port: int) -> list[int]:
    """Processes running `prefect server start ... --port PORT`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"server" in cmdline and b"start" in cmdline and str(port).encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_serve_retrain_reacts_to_the_inbox_and_stops_on_ctrl_c(small_repo, tmp_path):
    """`nucleiseg serve-retrain` (what `make serve-retrain` runs): a local Prefect server, the deployment and the
    watcher; a file dropped in the inbox becomes an event, the trigger a run, the run a refusal; SIGINT to the
    process group (Ctrl-C) stops it all."""
    root, env = small_repo
    port = _free_port()
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [Path(sys.executable).parent / "nucleiseg", "serve-retrain", "--repo-dir", str(root), "--port", str(port)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to send it a terminal's Ctrl-C
        )
    try:
        _wait_for(lambda: "Ctrl-C stops" in log.read_text() or proc.poll() is not None, 180, "the service")
        assert proc.poll() is None, log.read_text()
        inbox = root / "inbox"
        earlier = set((inbox / inbox_lib.REFUSED).glob("*/record.json"))  # left by the tests above
        culprit = _broken_geojson(inbox, root / "data")

        def new_records() -> list[Path]:
            return sorted(set((inbox / inbox_lib.REFUSED).glob("*/record.json")) - earlier)

        def summary_recorded() -> bool:  # the inbox step writes the record, then the flow adds its summary
            return any("trigger" in json.loads(path.read_text()) for path in new_records())

        _wait_for(summary_recorded, 120, f"the run started by the event (log: {log})")
        (record_path,) = new_records()
        record = json.loads(record_path.read_text())
        assert record["action"] == "refused" and record["trigger"] == "inbox event: broken.geojson, broken.png"
        assert culprit in (record_path.parent / "REASON.txt").read_text()
        assert f"http://127.0.0.1:{port}/api" in log.read_text() and _server_processes(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0, log.read_text()[-3000:]
    _wait_for(lambda: not _session_processes(proc.pid), 10, "the service's children to end")
    _wait_for(lambda: not _server_processes(port), 10, "the Prefect server to end")
