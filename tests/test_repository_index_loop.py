"""RepositoryIndex lists the repository folders off the event loop, and still answers as before.

A slow or network filesystem must not stall requests on the loop: the listing
(`registry.model_paths`) runs on an executor thread; only the in-memory registry is read on
the loop. The first test runs a server in this process (on its own thread and loop) and
records which thread lists the folders.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from lifecycle_util import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from util import BROKEN_CONFIG_TEXT, ServerProcess, identity_config, scaled, write_model

from server import app
from server.repository import registry
from server.settings import Settings


def _identity(repo: Path, name: str, versions: tuple[int, ...] = (1,), extra: str = "") -> None:
    write_model(repo, name, identity_config(name, [("INPUT0", "FP32", [4])], extra=extra), versions=versions)


class InProcessServer:
    """`server.app.serve` on a thread of its own with its own event loop; the port is taken from build_server."""

    def __init__(self, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
        self.port = 0
        self.loop_thread = 0
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        real_build = app.build_server

        def build_server(*args: Any, **kwargs: Any) -> Any:
            server, port = real_build(*args, **kwargs)
            self.port = port
            return server, port

        monkeypatch.setattr(app, "build_server", build_server)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self.loop_thread = threading.get_ident()
            self._stop = asyncio.Event()
            self._started.set()
            await app.serve(settings, self._stop)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:
                self.error = exc
                self._started.set()

        self._thread = threading.Thread(target=run, name="in-process-server", daemon=True)
        self._thread.start()
        assert self._started.wait(scaled(30))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(scaled(30))
        gc.unfreeze()  # serve() froze this process's objects once loading finished
        assert not self._thread.is_alive(), "the in-process server did not stop"


def test_listing_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _identity(tmp_path, "loaded")
    _identity(tmp_path, "not_loaded")
    threads: list[int] = []
    real = registry.model_paths

    def spy(repository: Path) -> list[Path]:
        threads.append(threading.get_ident())
        return real(repository)

    monkeypatch.setattr(registry, "model_paths", spy)
    settings = Settings(model_repositories=(tmp_path,), grpc_address="127.0.0.1", grpc_port=0,
                        model_control_mode="explicit", load_models=("loaded",), exit_timeout_secs=1.0)
    server = InProcessServer(settings, monkeypatch)
    try:
        assert server.error is None, server.error
        wait_until(lambda: server.port, what="the gRPC port")
        cli = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        wait_until(cli.is_server_ready, what="startup loading")
        threads.clear()
        rows = [(r.name, r.version, r.state, r.reason) for r in cli.get_model_repository_index().models]
        assert rows == [("loaded", "1", "READY", ""), ("not_loaded", "", "", "")]
        assert threads, "RepositoryIndex did not list the repository"
        assert server.loop_thread not in threads, "RepositoryIndex listed the repository on the event loop"
        cli.close()
    finally:
        server.stop()


@pytest.fixture
def index_server(tmp_path: Path, server_factory) -> tuple[ServerProcess, Path]:
    _identity(tmp_path, "a_ready")
    _identity(tmp_path, "b_never_loaded")
    write_model(tmp_path, "c_broken", BROKEN_CONFIG_TEXT)
    policy = "version_policy: { specific: { versions: [ 1, 3 ] } }\n"
    _identity(tmp_path, "d_versions", versions=(1, 2, 3), extra=policy)
    _identity(tmp_path, ".hidden")
    (tmp_path / "notes.txt").write_text("not a model")
    srv = server_factory(tmp_path, "--model-control-mode", "explicit", "--load-model", "a_ready",
                         "--load-model", "c_broken", "--load-model", "d_versions")
    return srv, tmp_path


def _index(srv: ServerProcess, ready: bool = False) -> list[tuple[str, str, str, str]]:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.url))
    response = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=ready), timeout=30)
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_index_rows_order_states_and_reasons(index_server: tuple[ServerProcess, Path]) -> None:
    srv, repo = index_server
    rows = _index(srv)
    assert [r[:3] for r in rows] == [
        ("a_ready", "1", "READY"),
        ("b_never_loaded", "", ""),
        ("c_broken", "", "UNAVAILABLE"),
        ("d_versions", "1", "READY"),
        ("d_versions", "3", "READY"),
    ]
    reasons = {name: reason for name, _, _, reason in rows}
    assert str(repo / "c_broken" / "config.pbtxt") in reasons["c_broken"]
    assert all(not reason for name, reason in reasons.items() if name != "c_broken")
    assert _index(srv, ready=True) == [
        ("a_ready", "1", "READY", ""), ("d_versions", "1", "READY", ""), ("d_versions", "3", "READY", "")]


def test_index_follows_the_folders_on_every_call(index_server: tuple[ServerProcess, Path]) -> None:
    srv, repo = index_server
    _identity(repo, "e_added")
    shutil.rmtree(repo / "b_never_loaded")
    names = [r[0] for r in _index(srv)]
    assert names == ["a_ready", "c_broken", "d_versions", "d_versions", "e_added"]
    shutil.rmtree(repo / "a_ready")  # loaded models stay listed while they serve, as before
    assert [r[:3] for r in _index(srv)][0] == ("a_ready", "1", "READY")
