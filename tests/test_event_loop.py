"""`--event-loop`: the same server on asyncio's own loop and on uvloop (unary, stream, shutdown).
The rest of the suite runs on the default (`auto`: uvloop where installed, and it is a dependency).

Which loop really ran is checked three ways, so that neither a log line written from the flag
nor an import that never installs the loop can pass:
- the startup line names the running loop's module ("event loop: uvloop|asyncio"),
- uvloop's extension is mapped into the process exactly when it was asked for,
- the server's main thread (the event loop's) waits in an epoll call whose `maxevents` gives
  away who made it: libuv always asks for up to 1024 events, asyncio's selector for as many
  as it has registered file descriptors (a handful here).
"""

from __future__ import annotations

import os
import queue
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import MODEL_REPOSITORY, ServerProcess, scaled

LOOP_LINE = re.compile(r"Started GRPCInferenceService at \S+ \(event loop: (\w+)\)")
LIBUV_MAXEVENTS = 1024  # libuv's uv__io_poll: `struct epoll_event events[1024]`


def epoll_wait_of_main_thread(pid: int) -> tuple[int, int]:
    """(epoll fd, maxevents) of the epoll call the process's main thread is blocked in, read from
    /proc/PID/syscall ("NR arg1 arg2 ..."); the fd is checked to be an epoll instance, so the
    syscall number (which differs between architectures) does not matter."""
    syscall_file = Path(f"/proc/{pid}/syscall")
    if not syscall_file.exists():
        pytest.skip("no /proc/PID/syscall on this system: the loop's epoll call cannot be observed")
    seen: list[str] = []
    for _ in range(200):  # the loop is idle almost all the time; catch it blocked
        fields = syscall_file.read_text().split()
        seen.append(" ".join(fields[:5]))
        if len(fields) >= 5 and fields[0] not in ("running", "-1"):
            epfd, maxevents = int(fields[1], 16), int(fields[3], 16)
            try:
                target = os.readlink(f"/proc/{pid}/fd/{epfd}")
            except OSError:
                target = ""
            if target == "anon_inode:[eventpoll]":
                return epfd, maxevents
        os.sched_yield()
    raise AssertionError(f"the main thread was never seen blocked in epoll: {seen[-5:]}")


@pytest.mark.parametrize("loop,expected", [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")])
def test_event_loop_runs_the_loop_asked_for(server_factory, loop: str, expected: str) -> None:
    srv: ServerProcess = server_factory(MODEL_REPOSITORY, "--event-loop", loop)
    match = LOOP_LINE.search(srv.log)
    assert match, srv.log
    assert match.group(1) == expected, match.group(0)

    maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
    uvloop_mapped = re.search(r"/uvloop/loop\.[^/\s]*\.so", maps) is not None
    assert uvloop_mapped == (expected == "uvloop"), f"uvloop's extension mapped: {uvloop_mapped}"

    _, maxevents = epoll_wait_of_main_thread(srv.proc.pid)
    if expected == "uvloop":
        assert maxevents == LIBUV_MAXEVENTS, f"the loop's epoll asks for {maxevents} events: not libuv's"
    else:
        assert maxevents < LIBUV_MAXEVENTS, f"the loop's epoll asks for {maxevents} events: libuv's, not asyncio's"

    check_serves_unary_and_stream(srv)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait(30) == 0, srv.log


def check_serves_unary_and_stream(srv: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(srv.url)
    assert client.is_server_ready()
    rng = np.random.default_rng(7)
    a = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    b = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "INT32"), grpcclient.InferInput("INPUT1", [2, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(5):
        client.async_stream_infer("simple", inputs, request_id=str(i))
    got = [answers.get(timeout=scaled(10)) for _ in range(5)]
    client.stop_stream()
    assert all(error is None for _, error in got)
    assert sorted(r.get_response().id for r, _ in got) == [str(i) for i in range(5)]
    for r, _ in got:
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    client.close()
