"""The suite checks the Python that runs it, on every version pyproject.toml allows.

CI runs Python 3.11 only; the CUDA image (Ubuntu 24.04) runs 3.12. A difference between versions
has already cost a GPU session (server/aio.py handed 3.12's Task a generator-based coroutine:
tests/test_aio_unit.py). These tests keep `<venv>/bin/python -m pytest` under another version an
honest check of that version.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from util import PYTHON, ServerProcess

from server import app


def test_servers_run_on_the_python_that_runs_the_suite(identity_server: ServerProcess) -> None:
    """tests/util.py once started every server with the worktree's .venv/bin/python whenever one
    existed: a suite run under Python 3.12 tested a 3.11 server, and passed where 3.12 failed."""
    assert PYTHON == sys.executable
    server_python = Path(f"/proc/{identity_server.proc.pid}/exe").resolve()
    assert server_python == Path(sys.executable).resolve(), (
        f"the server runs {server_python}, the suite {sys.executable} (Python {sys.version.split()[0]})")


class _NeverDrained:
    """What `app._drain` reads of the servicer: requests that are never answered."""

    inflight = 1

    async def drained(self) -> None:
        await asyncio.get_running_loop().create_future()


def test_the_exit_drain_ends_at_its_timeout_with_python_3_10s_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Python 3.10 (allowed by pyproject.toml) `asyncio.wait_for` raises asyncio's own
    TimeoutError, not the builtin one (the same class from 3.11 on): server/app.py caught the
    builtin, so on 3.10 a server whose drain, lame duck or refusal wait timed out died with a
    traceback and exit status 1 (tests/test_shutdown.py, test_python_backend.py's finalize test
    failed so under 3.10). 3.10's distinct class is imposed here on any Python."""
    real_wait_for, real_timeout = asyncio.wait_for, asyncio.TimeoutError

    class Py310TimeoutError(Exception):
        pass

    async def wait_for(awaitable, timeout):  # type: ignore[no-untyped-def]
        try:
            return await real_wait_for(awaitable, timeout)
        except (TimeoutError, real_timeout) as exc:
            raise Py310TimeoutError from exc

    monkeypatch.setattr(asyncio, "TimeoutError", Py310TimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for)
    asyncio.run(app._drain(_NeverDrained(), 0.05))  # type: ignore[arg-type]
