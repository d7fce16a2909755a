"""A BLS caller stalled on a decoupled call it does not iterate (the callee held back by the
caller's window, test_stream_backpressure_flows.py) must not stall the server's own
lifecycle: unloading the callee or the caller ends within --exit-timeout-secs, the model
that stays serves the next request, and SIGTERM stops the server within its exit timeout.
Each test has its own server (explicit model control), as each ends one of its models."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_stream_backpressure import BURST, _burst_config, _channel, _read_burst_on_new_channel
from test_stream_backpressure_flows import CALLER_CONFIG, FANOUT, _call_caller, _wait_marker
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, scaled, write_model

EXIT_TIMEOUT_S = 3.0
CALLS, COUNT, SIZE = 8, 600, 1024  # more answers than the caller's socket holds
# The caller, writing its stub's pid to a file `pid` in its folder.
PID_CALLER = FANOUT.replace('        self.folder = args["model_repository"]\n',
                            '''        self.folder = args["model_repository"]
        with open(os.path.join(self.folder, "pid"), "w") as f:
            f.write(str(os.getpid()))
''')


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, list[object], threading.Thread]]:
    """A server whose `caller` made 8 decoupled calls of 600 x 1 KB answers to `many` (8
    instances) and iterates none of them until a file `go` appears (up to 120 s): the
    callees are held back, and their windows fill the caller's socket (a loop that blocked
    on it would stall the unload and the shutdown). Yields the server, the repository, the
    caller's result (filled when its request ends) and the thread waiting for it."""
    write_model(tmp_path, "many", _burst_config("many", CALLS), files={"1/model.py": BURST.encode()})
    write_model(tmp_path, "caller", CALLER_CONFIG, files={"1/model.py": PID_CALLER.encode()})
    srv = ServerProcess([tmp_path], ["--model-control-mode", "explicit", "--load-model", "caller",
                                     "--load-model", "many", "--exit-timeout-secs", f"{EXIT_TIMEOUT_S:g}"])
    result: list[object] = []
    thread = threading.Thread(target=_call_caller, args=(srv, COUNT, SIZE, CALLS, result), daemon=True)
    try:
        thread.start()
        time.sleep(3.0)  # the callees fill their windows and wait, the caller reads nothing
        assert not (tmp_path / "many" / f"sent-{COUNT}").exists(), "the callees were not held back"
        assert not result, result
        yield srv, tmp_path, result, thread
    finally:
        (tmp_path / "caller" / "go").touch()
        srv.stop()
        thread.join(scaled(30))


def _unload(srv: ServerProcess, name: str) -> float:
    """RepositoryModelUnload of `name`; returns how long it took, in seconds."""
    channel = _channel(srv)
    try:
        started = time.monotonic()
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name=name), timeout=scaled(60))
        return time.monotonic() - started
    finally:
        channel.close()


def _unload_in_time_then_iterate(srv: ServerProcess, repo: Path, thread: threading.Thread, name: str) -> None:
    """Unload `name` while the caller is stalled: it must end within the exit timeout; then the
    caller iterates (its thread ends)."""
    took = _unload(srv, name)
    print(f"unload of {name} while the caller is stalled: {took:.2f} s")
    assert took < EXIT_TIMEOUT_S + scaled(5), f"the unload took {took:.1f} s"
    (repo / "caller" / "go").touch()
    thread.join(scaled(30))


def test_unloading_the_callee_of_a_stalled_bls_caller_ends_in_time(stalled) -> None:
    """The callee is unloaded while its answers wait for the caller: the unload ends within
    the exit timeout, and the caller, once it iterates, gets its answer (the callee finished
    its request) or an error, not a hang."""
    srv, repo, result, thread = stalled
    _unload_in_time_then_iterate(srv, repo, thread, "many")
    assert result == [CALLS * COUNT] or (len(result) == 1 and isinstance(result[0], Exception)), result


def test_unloading_a_stalled_bls_caller_ends_in_time(stalled) -> None:
    """The caller is unloaded while it does not iterate: the unload ends within the exit
    timeout (a busy instance is left alone, as any model busy in `execute`); once the caller
    iterates, it gets every answer, and the callees serve the next client."""
    srv, repo, result, thread = stalled
    _unload_in_time_then_iterate(srv, repo, thread, "caller")
    assert result == [CALLS * COUNT], result
    _read_burst_on_new_channel(srv, "many", 5, SIZE, scaled(20))
    assert _wait_marker(repo / "many" / "sent-5", scaled(10))


def test_sigterm_with_a_stalled_bls_caller_stops_in_time(stalled) -> None:
    """SIGTERM while a BLS caller is stalled: the server drains for its exit timeout, then
    unloads (5 s per busy model at most) and stops; its event loop never blocks on the
    caller's socket. (The process itself then still waits for the stub call a thread is
    blocked on, as with any model busy in `execute`: not checked here.)"""
    srv, _, _, _ = stalled
    started = time.monotonic()
    srv.terminate()
    srv.wait_for_log(re.compile(r"nereid\] stopped$"), EXIT_TIMEOUT_S + 2 * 5.0 + 10)
    took = time.monotonic() - started
    print(f"SIGTERM with a stalled BLS caller: stopped after {took:.2f} s")


def test_a_stalled_bls_caller_whose_stub_dies_frees_the_callee(stalled) -> None:
    """The caller's stub is killed while its decoupled call waits for credit: its request
    fails, the call stops (the callee's request is cancelled, nothing waits for credit any
    more) and the callee's one instance serves the next client."""
    srv, repo, result, thread = stalled
    os.kill(int((repo / "caller" / "pid").read_text()), signal.SIGKILL)
    thread.join(scaled(30))
    assert len(result) == 1 and isinstance(result[0], Exception), result
    _read_burst_on_new_channel(srv, "many", 5, SIZE, scaled(20))
    assert _wait_marker(repo / "many" / "sent-5", scaled(10))
