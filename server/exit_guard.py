"""The process exits once the server has stopped, even if a model is still busy.

Why: shutdown waits `--exit-timeout-secs` for requests and then unloads, leaving an instance
that is still inside a model's `execute` (a Python model in `time.sleep`, a hung call) "not
released". The thread waiting on that instance is a non-daemon thread-pool worker, and Python
joins those at exit: the process logged "stopped" and then stayed until the model returned —
forever for a hung model, so `docker stop` and Kubernetes had to SIGKILL it. Triton exits once
its timeout has passed. Here, after the server stopped, a daemon thread gives the normal exit
`grace` seconds; past that it kills the child processes still running (Python stubs busy in
`execute`, which would otherwise outlive the server), and ends the process with its exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("nereid")

GRACE_S = 2.0


def arm(code: int, grace: float = GRACE_S) -> None:
    """Exit with `code` in `grace` seconds if the interpreter has not exited by then."""
    threading.Thread(target=_fire, args=(code, grace), name="nereid-exit-guard", daemon=True).start()


def _fire(code: int, grace: float) -> None:
    time.sleep(grace)
    busy = sorted(t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread())
    try:
        killed = kill_children()
    except OSError:  # no /proc: nothing to kill that we can find
        killed = []
    log.warning("exiting %.0fs after stopping although %d thread(s) are still busy in models (%s): abandoned, "
                "as are %d child process(es) still running (killed)", grace, len(busy), ", ".join(busy) or "-",
                len(killed))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def children(pid: int | None = None) -> list[int]:
    """The child processes of `pid` (this one by default), whichever of its threads started them."""
    parent = os.getpid() if pid is None else pid
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as listing:
                found += [int(child) for child in listing.read().split()]
        except OSError:
            continue  # that thread ended meanwhile
    return found


def kill_children() -> list[int]:
    """SIGKILL this process's children; returns their pids."""
    killed = []
    for pid in children():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed
