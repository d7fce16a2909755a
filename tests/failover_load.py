"""Steady inference load through a load balancer, with every request's outcome kept.

N client threads, each with its own tritonclient.grpc client (one channel, as a real client
has), send one request after another until told to stop. Each request carries its own id in
the `x-request-id` header, so the balancer's access log says where it went; each outcome is
kept with the phase of the test in which the request was sent and the times it was sent and
answered.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from balancer import REQUEST_ID_HEADER
from tritonclient.utils import InferenceServerException
from util import scaled


@dataclasses.dataclass
class Outcome:
    request_id: str
    phase: str  # the phase in which it was sent
    code: str  # "OK", "WRONG_ANSWER", or the gRPC status name (UNAVAILABLE, CANCELLED, ...)
    message: str
    sent: float  # monotonic
    done: float  # monotonic

    def in_flight_at(self, moment: float) -> bool:
        return self.sent < moment <= self.done


class Load:
    """`threads` clients sending `model` (INPUT0 -> OUTPUT0, FP32 [1, 4]) requests through `url`
    until `stop()`; each answer is checked against its input."""

    def __init__(self, url: str, model: str, threads: int, channel_args: Sequence[tuple[str, Any]] | None = None,
                 timeout_s: float = 10.0, phase: str = "start") -> None:
        self.url = url
        self.model = model
        self.channel_args = list(channel_args) if channel_args else None
        self.timeout_s = scaled(timeout_s)
        self.phase = phase
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.url, channel_args=self.channel_args)
        data = np.arange(4, dtype=np.float32).reshape(1, 4) + index
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(data)
        n = 0
        try:
            while not self._stop.is_set():
                request_id = f"c{index}-{n}"
                n += 1
                phase, sent = self.phase, time.monotonic()
                try:
                    result = client.infer(self.model, [inp], request_id=request_id, client_timeout=self.timeout_s,
                                          headers={REQUEST_ID_HEADER: request_id})
                    answer = result.as_numpy("OUTPUT0")
                    ok = answer is not None and np.array_equal(answer, data)
                    code, message = ("OK", "") if ok else ("WRONG_ANSWER", repr(answer))
                except InferenceServerException as exc:
                    code = (exc.status() or "None").removeprefix("StatusCode.")
                    message = exc.message() or ""
                outcome = Outcome(request_id, phase, code, message, sent, time.monotonic())
                with self._lock:
                    self.outcomes.append(outcome)
                if code != "OK":
                    time.sleep(0.01)  # a failing client does not spin
        finally:
            client.close()

    def set_phase(self, phase: str) -> float:
        """Requests sent from now on belong to `phase`; returns the moment (monotonic)."""
        self.phase = phase
        return time.monotonic()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_ok(self, more: int, timeout: float) -> None:
        """Until `more` further requests have succeeded (the load is flowing)."""
        def ok() -> int:
            return sum(1 for o in self.snapshot() if o.code == "OK")

        target = ok() + more
        deadline = time.monotonic() + scaled(timeout)
        while ok() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {more} requests succeeded in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the last answers; every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + scaled(10))
        return self.snapshot()
