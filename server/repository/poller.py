"""Poll mode: scan the repositories, apply the two-scan rule, hand changed models to the loaders.

A scan only stats files (changes.py), after the object-store mirrors have
been brought up to date (mirror.py: they apply the two-scan rule to the object
listing, so their models are not made to wait a second time); loads run on the manager's loader pool,
one action per model at a time. A model whose action is still running is
looked at again on a later scan, so a slow load of one model never delays
picking up changes to the others, and a scan never waits for a load.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, wait

from server.repository.actions import Source
from server.repository.changes import ChangeDetector
from server.repository.manager import RepositoryManager

log = logging.getLogger("nereid.poll")


class Poller:
    def __init__(self, manager: RepositoryManager) -> None:
        self.manager = manager
        self.detector = ChangeDetector()
        self._running: dict[str, Future[object]] = {}
        self._lock = threading.RLock()  # a done-callback may run inside poll()
        self._closed = False

    def start(self, settle_secs: float) -> None:
        """Startup: two scans `settle_secs` apart, then load what stayed still (waits for the loads)."""
        self.poll()
        time.sleep(settle_secs)
        self.poll()
        self.wait()

    def poll(self) -> None:
        """One scan; returns once the changed models are handed to the loaders (not loaded)."""
        with self._lock:
            if self._closed:
                return
            self._running = {n: f for n, f in self._running.items() if not f.done()}
            busy = frozenset(self._running)
            remote = self.manager.remote
            remote.sync(stable=True, busy=busy)  # object-store mirrors first: they apply the two-scan rule
            snapshots = self.manager.scan()
            settled = frozenset(name for name, snap in snapshots.items() if remote.holds(snap.path))
            changes = self.detector.observe(snapshots, busy, settled)
            if changes.unsettled:
                log.debug("changing, looked at again next scan: %s", ", ".join(changes.unsettled))
            submit = self.manager.loader.submit
            started: dict[str, Future[object]] = {
                snap.name: submit(self.manager.apply, Source(snap, retry_failed=False)) for snap in changes.apply}
            started.update({name: submit(self.manager.remove, name) for name in changes.remove})
            self._running.update(started)
            for name, future in started.items():
                future.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, future: Future[object]) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("model '%s': repository action failed unexpectedly", name, exc_info=exc)
            with self._lock:
                self.detector.forget(name)  # try again at the next stable scan

    def wait(self, timeout: float | None = None) -> None:
        wait(list(self._running.values()), timeout)

    def close(self, timeout: float | None = None) -> None:
        """No more scans; wait for the actions already handed out."""
        with self._lock:
            self._closed = True
        self.wait(timeout)
