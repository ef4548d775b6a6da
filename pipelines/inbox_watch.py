"""The annotations inbox watcher: file arrivals become one Prefect event per burst.

Definitions
-----------
arrival
    A file created, written, closed after writing, or moved into the inbox folder (top level, name not
    starting with a dot). Deletions and moves out of the inbox are not arrivals: the retraining flow itself
    moves processed files to ``.done/`` and ``.refused/``, and that must not start another run.
burst
    Arrivals with less than ``quiet_s`` seconds between one and the next. A burst ends ``quiet_s`` seconds
    after its last arrival; a file still being copied keeps writing, so it keeps its burst open.
inbox event
    One Prefect event per burst: name :data:`INBOX_EVENT`, resource ``nucleiseg.inbox.<absolute inbox path>``
    (:func:`inbox_resource`, so a deployment reacts only to its own inbox when several projects share a
    server), payload ``{"inbox": path, "files": [names, sorted, at most MAX_LISTED]}``. The retraining
    deployment's trigger (:func:`pipelines.retrain.build_deployment`) starts a run on it.

Why a watcher and an event rather than a Prefect-native mechanism: Prefect 3 has no file-system trigger; its
triggers react to events, and a served deployment (``flow.serve`` / ``serve``) can carry event triggers beside
its cron schedule, so one deployment takes both the inbox events and the nightly fallback, with one
concurrency limit over both. Polling on a short interval instead would create a flow run every few minutes
whether or not anything arrived. The debounce is on the watcher's side because a Prefect reactive trigger with
``threshold=1`` fires on the first event of a window: it cannot wait for a burst to end.

When the watcher starts it announces the files already waiting in the inbox (dropped while nothing watched),
so a restart never strands them until the next scheduled run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

INBOX_EVENT = "nucleiseg.inbox.changed"
MAX_LISTED = 200  # file names carried by one event; a larger burst still makes one event


def inbox_resource(inbox: str | os.PathLike[str]) -> dict[str, str]:
    """The Prefect resource of an inbox folder: its id names the absolute path (what a trigger matches)."""
    path = Path(inbox).resolve()
    return {"prefect.resource.id": f"nucleiseg.inbox.{path}", "prefect.resource.name": f"annotations inbox {path}"}


def emit_inbox_event(inbox: str | os.PathLike[str], files: Iterable[str]) -> Any:
    """Send the inbox event (module docstring) to the Prefect API in force; returns the event (or None when
    events are off)."""
    from prefect.events import emit_event

    names = sorted(set(files))
    return emit_event(
        event=INBOX_EVENT,
        resource=inbox_resource(inbox),
        payload={"inbox": str(Path(inbox).resolve()), "files": names[:MAX_LISTED], "n_files": len(names)},
    )


def _arrival(inbox: Path, event: FileSystemEvent) -> str | None:
    """The name of the file that arrived, or None when the event is not an arrival."""
    if isinstance(event, FileMovedEvent):
        raw = event.dest_path
    elif isinstance(event, FileCreatedEvent | FileModifiedEvent | FileClosedEvent):
        raw = event.src_path
    else:  # deletions, directories, opened or closed without writing
        return None
    path = Path(os.fsdecode(raw))
    if path.parent.resolve() != inbox or path.name.startswith((".", "#")):
        return None  # in an archive folder, or a temporary (a copy in progress, a lock's probe file)
    return path.name


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        name = _arrival(self.watcher.inbox, event)
        if name is not None:
            self.watcher.arrived(name)


class InboxWatcher:
    """Watch ``inbox`` and call ``announce(names)`` once per burst (module docstring).

    ``start()`` creates the folder when needed, announces the files already there, and starts watching;
    ``stop()`` stops the observer and the debounce thread; a burst not yet ended is dropped, not announced to a
    server that may be stopping too: its files are still in the inbox, and the next ``start()`` announces them.
    """

    def __init__(self, inbox: str | os.PathLike[str], announce: Callable[[list[str]], Any], quiet_s: float) -> None:
        self.inbox = Path(inbox).resolve()
        self.announce = announce
        self.quiet_s = float(quiet_s)
        self._pending: set[str] = set()
        self._last = 0.0
        self._lock = threading.Condition()
        self._stopping = False
        self._observer = Observer()
        self._thread = threading.Thread(target=self._debounce, name="inbox-debounce", daemon=True)
        self.announced: list[list[str]] = []  # every burst announced, in order

    def arrived(self, name: str) -> None:
        with self._lock:
            self._pending.add(name)
            self._last = time.monotonic()
            self._lock.notify()

    def _debounce(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                remaining = self._last + self.quiet_s - time.monotonic()
                if remaining > 0:
                    self._lock.wait(timeout=remaining)
                    continue
                names, self._pending = sorted(self._pending), set()
            self.announced.append(names)
            self.announce(names)

    def start(self) -> InboxWatcher:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Handler(self), str(self.inbox), recursive=False)
        self._observer.start()
        self._thread.start()
        waiting = [p.name for p in self.inbox.iterdir() if p.is_file() and not p.name.startswith(".")]
        if waiting:
            with self._lock:
                self._pending.update(waiting)
                self._last = time.monotonic() - self.quiet_s  # announce at once: nothing is being written
                self._lock.notify()
        return self

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=10)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def __enter__(self) -> InboxWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["INBOX_EVENT", "InboxWatcher", "emit_inbox_event", "inbox_resource"]
