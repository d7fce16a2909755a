"""The suite checks the Python that runs it, on every version pyproject.toml allows.

CI runs Python 3.11 only; the CUDA image (Ubuntu 24.04) runs 3.12. A difference between versions
has already cost a GPU session (server/aio.py handed 3.12's Task a generator-based coroutine:
tests/test_aio_unit.py). These tests keep `<venv>/bin/python -m pytest` under another version an
honest check of that version.
"""

from __future__ import annotations

import sys
from pathlib import Path

from util import PYTHON, ServerProcess


def test_servers_run_on_the_python_that_runs_the_suite(identity_server: ServerProcess) -> None:
    """tests/util.py once started every server with the worktree's .venv/bin/python whenever one
    existed: a suite run under Python 3.12 tested a 3.11 server, and passed where 3.12 failed."""
    assert PYTHON == sys.executable
    server_python = Path(f"/proc/{identity_server.proc.pid}/exe").resolve()
    assert server_python == Path(sys.executable).resolve(), (
        f"the server runs {server_python}, the suite {sys.executable} (Python {sys.version.split()[0]})")
