"""Start, watch, restart and stop the frontend processes of `nereid serve --workers N`.

The pool stands where the single-process server's grpc.aio server stands in app.py
(`start`, `stop(grace)`), so the shutdown sequence — lame duck, refusal, drain — is the
same code in both modes: the frontends keep forwarding while the owner's servicer decides
what is served, refused or drained, and `stop` closes their listeners last.

The port: the owner binds a socket with SO_REUSEPORT to the address and port (port 0
picks one) and never listens on it. It only holds the number for the frontends, which
bind the same address with SO_REUSEPORT and listen; the kernel spreads new connections
among the listening sockets only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import grpc

from server.settings import Settings
from server.workers import balance
from server.workers.owner import OwnerLink, handler_table

log = logging.getLogger("nereid.workers")

# A frontend that exits within this long of its start is crash-looping: restarts back off.
_STABLE_S = 10.0
_BACKOFF_MAX_S = 5.0
_START_TIMEOUT_S = 60.0
# A serving frontend is pinged this often; one that has not answered for _HUNG_S (stopped,
# deadlocked, stuck in a C call) holds its clients forever: it is killed and restarted.
_PING_S = 1.0
_HUNG_S = 10.0


class WorkerStartError(OSError):
    """A frontend did not start (its port could not be bound, or it exited): the server does not start."""


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    link: OwnerLink | None = None
    started_at: float = 0.0
    ready: asyncio.Future[int] | None = None
    restarts: int = 0
    backoff: float = 0.1
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerPool:
    """N frontend processes behind one address and port, all forwarding to this process."""

    def __init__(self, settings: Settings, services: dict[str, dict[str, grpc.RpcMethodHandler]]) -> None:
        self.settings = settings
        self._handlers = handler_table(services)
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._stopping = False
        self._holder = _reserve(settings.grpc_address, settings.grpc_port)
        self.port: int = self._holder.getsockname()[1]
        self.calls = [0] * settings.workers  # RPCs forwarded by each frontend (metrics)
        self._pinger: asyncio.Task[None] | None = None
        self._balance_fd = self._load_balance(settings)

    @staticmethod
    def _load_balance(settings: Settings) -> int | None:
        """The round-robin program each frontend attaches to its listener (balance.py), or None."""
        if settings.connection_balance != "round-robin" or settings.workers < 2:
            return None
        try:
            fd = balance.load(settings.workers)
        except (balance.BalanceUnavailable, OSError) as exc:
            # The hint: in a container `--cap-add BPF` alone is not enough (measured in the doc).
            log.warning("connections are spread over the %d frontends by the kernel's hash, not in turn: "
                        "the eBPF program could not be loaded (%s); what a container needs for it: "
                        "docs/DEPLOYMENT.md, \"--workers N in a container\"; --connection-balance=hash "
                        "chooses the hash without this warning", settings.workers, exc)
            return None
        log.info("new connections go to the %d frontends in turn (eBPF reuseport program)", settings.workers)
        return fd

    async def start(self) -> None:
        """Start every frontend and wait until each listens; a failure stops the others."""
        try:
            await asyncio.gather(*(self._start(worker) for worker in self._workers))
        except BaseException:
            await self.stop(0.0)
            raise
        for worker in self._workers:
            worker.watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        self._pinger = asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        """Kill a frontend whose event loop no longer turns; its watcher restarts it.

        Only time this process ran counts as a frontend's silence: when the owner itself did
        not run for a while (SIGSTOP, a paused container, a long call blocking its loop) it sent
        no PING and read no PONG meanwhile, and this loop runs before the next PING goes out, so
        without the shift below every frontend looked hung on resume and was killed."""
        last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(_PING_S)
            now = time.monotonic()
            stalled = now - last - _PING_S  # how much later than asked this loop woke up
            last = now
            for worker in self._workers:
                process, link = worker.process, worker.link
                if process is None or link is None or process.returncode is not None or link.protocol.closed:
                    continue
                if stalled > _PING_S:  # a whole round or more missed: not the frontend's doing
                    link.answered += stalled
                if worker.ready is not None and worker.ready.done() and now - link.answered > _HUNG_S:
                    log.error("worker %d (pid %d) did not answer for %.0fs: killed, to be restarted",
                              worker.index, process.pid, now - link.answered)
                    process.kill()
                    continue
                link.ping()

    async def _start(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        worker.ready = loop.create_future()
        try:
            command = [sys.executable, "-m", "server.workers.frontend", "--link-fd", str(theirs.fileno()),
                       "--index", str(worker.index), "--grpc-port", str(self.port)]
            passed = [theirs.fileno()]
            if self._balance_fd is not None:
                command += ["--balance-fd", str(self._balance_fd)]
                passed.append(self._balance_fd)
            command += ["--", *self.settings.serve_argv]
            worker.process = await asyncio.create_subprocess_exec(*command, pass_fds=passed)
        finally:
            theirs.close()
        worker.started_at = time.monotonic()
        worker.link = OwnerLink(worker.index, self._handlers, self._ready, self._lost, self.calls)
        await loop.connect_accepted_socket(lambda: worker.link.protocol, ours)  # type: ignore[union-attr]
        exited = asyncio.ensure_future(worker.process.wait())
        done, _ = await asyncio.wait([worker.ready, exited], timeout=_START_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if worker.ready in done:
            exited.cancel()
            log.info("worker %d (pid %d) serving", worker.index, worker.process.pid)
            return
        if exited in done:
            raise WorkerStartError(f"worker {worker.index} exited with code {exited.result()} before it served "
                                   "(see its error above)")
        exited.cancel()
        worker.process.kill()  # else a frontend hung in its start holds its slot for good (its watcher waits on it)
        raise WorkerStartError(f"worker {worker.index} did not start within {_START_TIMEOUT_S:.0f}s")

    def _ready(self, index: int, pid: int) -> None:
        ready = self._workers[index].ready
        if ready is not None and not ready.done():
            ready.set_result(pid)

    def _lost(self, index: int) -> None:
        if not self._stopping:
            log.error("worker %d's link closed", index)

    async def _watch(self, worker: _Worker) -> None:
        """Restart a frontend that exits while the server runs; its clients reconnect to the others."""
        while not self._stopping and worker.process is not None:
            code = await worker.process.wait()
            if self._stopping:
                return
            lived = time.monotonic() - worker.started_at
            worker.backoff = 0.1 if lived > _STABLE_S else min(worker.backoff * 2, _BACKOFF_MAX_S)
            log.error("worker %d (pid %d) exited with code %s; restarting it in %.1fs (the others keep serving)",
                      worker.index, worker.process.pid, code, worker.backoff)
            await asyncio.sleep(worker.backoff)
            if self._stopping:
                return
            try:
                await self._start(worker)
            except (OSError, WorkerStartError) as exc:
                log.error("worker %d did not restart: %s", worker.index, exc)
                worker.started_at = time.monotonic()
                continue
            worker.restarts += 1

    def snapshot(self) -> list[tuple[int, int, int, bool, float, int]]:
        """(index, calls forwarded, restarts, running, CPU seconds, resident bytes) per frontend, for
        the metrics endpoint's thread (the process_* families describe the owner only)."""
        rows = []
        for w in self._workers:
            running = w.process is not None and w.process.returncode is None
            cpu, rss = _usage(w.process.pid) if running and w.process is not None else (0.0, 0)
            rows.append((w.index, self.calls[w.index], w.restarts, running, cpu, rss))
        return rows

    async def stop(self, grace: float | None = None) -> None:
        """Close every frontend's listener, letting calls in progress finish for `grace` seconds."""
        self._stopping = True
        grace = 0.0 if grace is None else grace
        if self._pinger is not None:
            self._pinger.cancel()
        for worker in self._workers:
            if worker.watcher is not None:
                worker.watcher.cancel()
            if worker.link is not None:
                worker.link.stop(grace)
        waits = [w.process.wait() for w in self._workers if w.process is not None]
        if waits:
            done, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=grace + 5.0)
            for worker in self._workers:
                if worker.process is not None and worker.process.returncode is None:
                    log.warning("worker %d did not stop in time: killed", worker.index)
                    worker.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        self._holder.close()
        if self._balance_fd is not None:
            os.close(self._balance_fd)
            self._balance_fd = None


def _reserve(address: str, port: int) -> socket.socket:
    """Bind (never listen) a SO_REUSEPORT socket to hold the address and port for the frontends."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind(sockaddr)
    except OSError as exc:
        holder.close()
        raise WorkerStartError(f"could not bind {address}:{port}: {exc.strerror or exc}") from None
    return holder


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, resident bytes) of a process, from /proc; zeros if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[21]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0.0, 0


def usable_cores() -> int:
    """The cores this process may run on (`--workers auto`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
