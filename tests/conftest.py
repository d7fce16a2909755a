"""Fixtures: real Nereid servers in subprocesses, shared where the tests do not interfere.

- `onnx_server`: the example model_repository (ONNX Runtime models), whole session.
- `identity_server`: identity-backend models for protocol and datatype tests, whole session.
- `failure_server`: a repository of broken models next to one good one, whole session.
- `server_factory`: start private servers for one test; all are stopped at its teardown.

A skip is a failure unless the test is marked `gpu` or `nogpu` (the hooks of skip_policy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from skip_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks)
from util import (
    BROKEN_CONFIG_TEXT,
    ID_MAX_BATCH,
    IDENTITY_DATATYPES,
    MISSING_FILE_CONFIG,
    MODEL_REPOSITORY,
    STATS_DELAY_MS,
    ServerProcess,
    identity_config,
    shm_key,
    write_model,
)


@pytest.fixture(scope="session")
def session_servers() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def onnx_server(session_servers: list[ServerProcess]) -> ServerProcess:
    pytest.importorskip("onnxruntime")
    server = ServerProcess([MODEL_REPOSITORY])
    session_servers.append(server)
    return server


@pytest.fixture(scope="session")
def mlp_session():
    """The `mlp` model run in this process by onnxruntime, to check the server's answers."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODEL_REPOSITORY / "mlp" / "1" / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])


def build_identity_repo(repo: Path) -> Path:
    for datatype in IDENTITY_DATATYPES:
        write_model(
            repo, f"id_{datatype}",
            identity_config(f"id_{datatype}", [("IN", datatype, [-1])], max_batch_size=ID_MAX_BATCH, outputs=["OUT"]),
        )
    write_model(repo, "id_pair", identity_config(
        "id_pair", [("INPUT0", "FP32", [4]), ("INPUT1", "INT32", [4])], max_batch_size=4))
    write_model(repo, "id_nobatch", identity_config("id_nobatch", [("INPUT0", "INT32", [-1, -1])]))
    write_model(repo, "id_bytes", identity_config("id_bytes", [("INPUT0", "BYTES", [-1])]))
    write_model(
        repo, "id_versions",
        identity_config("id_versions", [("INPUT0", "FP32", [2])],
                        extra="version_policy: { specific: { versions: [ 1, 3 ] } }\n"),
        versions=(1, 2, 3),
    )
    write_model(repo, "id_latest", identity_config("id_latest", [("INPUT0", "FP32", [2])]), versions=(1, 2))
    write_model(repo, "id_stats", identity_config(
        "id_stats", [("INPUT0", "FP32", [2])], max_batch_size=8, execute_delay_ms=STATS_DELAY_MS))
    return repo


@pytest.fixture(scope="session")
def identity_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_identity_repo(tmp_path_factory.mktemp("identity_repo"))


@pytest.fixture(scope="session")
def identity_server(identity_repo: Path, session_servers: list[ServerProcess]) -> ServerProcess:
    server = ServerProcess([identity_repo])
    session_servers.append(server)
    return server


@pytest.fixture(scope="session")
def failure_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("failure_repo")
    write_model(repo, "good", identity_config("good", [("INPUT0", "FP32", [4])]))
    write_model(repo, "broken_config", BROKEN_CONFIG_TEXT)
    write_model(repo, "missing_file", MISSING_FILE_CONFIG)
    write_model(repo, "no_version", identity_config("no_version", [("INPUT0", "FP32", [4])]), versions=())
    write_model(repo, "name_mismatch", identity_config("other_name", [("INPUT0", "FP32", [4])]))
    write_model(repo, "unknown_backend", identity_config("unknown_backend", [("INPUT0", "FP32", [4])]).replace(
        'backend: "identity"', 'backend: "no_such_backend"'))
    return repo


@pytest.fixture(scope="session")
def failure_server(failure_repo: Path, session_servers: list[ServerProcess]) -> ServerProcess:
    server = ServerProcess([failure_repo])
    session_servers.append(server)
    return server


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    """start(repos, *extra_args) -> ServerProcess; every server started is stopped at teardown."""
    servers: list[ServerProcess] = []

    def start(repos: Path | Sequence[Path], *extra_args: str) -> ServerProcess:
        server = ServerProcess([repos] if isinstance(repos, Path) else list(repos), extra_args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def shm_region() -> Iterator[Callable[[int], tuple[object, str]]]:
    """Make system shared-memory regions (tritonclient.utils.shared_memory) for one test:
    `shm_region(size)` gives (handle, key); each is destroyed (shm_unlink) at the test's end.
    Shared by the gRPC and HTTP shared-memory tests."""
    import tritonclient.utils.shared_memory as shm

    made: list[object] = []

    def make(size: int) -> tuple[object, str]:
        key = shm_key()
        handle = shm.create_shared_memory_region(key[1:], key, size)
        made.append(handle)
        return handle, key

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)
