"""The instances of one model version, from creation to release.

A version's life (states in server/core/state.py): LOADING while its instances are placed,
loaded, warmed up and put under the execution watchdog; READY once their threads start;
UNLOADING while in-flight requests finish; UNAVAILABLE after a failed load, after unload,
or once every instance was taken out of service for failing (server/core/faults.py).
`Model` drives the states; `InstancePool` does the work on the instances, on a loader
thread, never on the event loop. A failed load releases whatever it had made, so a Model
is loaded at most once and the repository retries with a fresh one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from time import monotonic, sleep

from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Backend, BackendError, ModelSpec
from server.core.faults import WATCHDOG
from server.core.instance import CostTracker, ModelInstance, OutputShaper
from server.core.placement import place_instances, visible_gpus
from server.core.scheduler import Job, Scheduler
from server.core.stats import ModelStats
from server.core.warmup import WarmupSample, run_warmup

log = logging.getLogger("nereid.model")


def check_backend(cls: type[Backend], spec: ModelSpec, decoupled: bool) -> None:
    """Refuse, before any instance exists, a backend that cannot serve this version."""
    if decoupled and not cls.supports_decoupled:
        raise BackendError(f"the {cls.name} backend does not support the decoupled transaction policy "
                           "(model_transaction_policy { decoupled: true })")
    if cls.needs_model_file and not spec.model_file.exists():
        raise BackendError(f"model file {spec.model_file} does not exist")


class InstancePool:
    """A version's instances: created, warmed, watched, started; later drained and closed."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.members: list[ModelInstance] = []

    def create(self, cls: type[Backend], spec: ModelSpec, groups: Iterable[mc.ModelInstanceGroup],
               pulls: Callable[[], Scheduler], shaper: OutputShaper, stats: ModelStats, cost: CostTracker,
               threshold: int, retired: Callable[[ModelInstance], bool]) -> None:
        """One loaded backend per placement (server/core/placement.py; PlacementError with a
        reason if the groups cannot be placed). `pulls` gives each new instance what it pulls
        work from; `retired` is told when an instance kept failing (faults.py)."""
        for placement in place_instances(groups, visible_gpus(), cls.supports_gpu):
            backend = cls()
            backend.load(replace(spec, instance_name=placement.name), placement.device)
            instance = ModelInstance(placement.name, backend, pulls(), shaper, stats, cost, threshold, retired)
            self.members.append(instance)

    def warm(self, samples: list[WarmupSample], shaper: OutputShaper, decoupled: bool) -> None:
        """Run the `model_warmup` samples on every instance, before the instance threads start
        and before READY, so no request meets a cold instance (server/core/warmup.py)."""
        run_warmup(self.label, samples, [(i.name, i.backend.execute) for i in self.members], shaper,
                   decoupled=decoupled)

    def watch(self, timeout_s: float) -> None:
        """Put every instance under the execution watchdog (faults.py); 0: no timeout."""
        if timeout_s:
            for instance in self.members:
                WATCHDOG.watch(instance.watched, timeout_s, functools.partial(_expired, instance, timeout_s))

    def start(self) -> None:
        for instance in self.members:
            instance.start()

    def serving(self) -> bool:
        """Whether any instance is still in service."""
        return any(not i.retired for i in self.members)

    def close(self) -> None:
        """Release every backend at once (after a failed load: no thread has started)."""
        for instance in self.members:
            instance.close()
        self.members = []

    def release(self, inflight: Callable[[], int], scheduler: Scheduler, timeout: float | None) -> None:
        """Let the in-flight requests finish, then stop the instances and release the backends.

        `timeout` bounds the whole wait; an instance still busy after it is left alone (closing
        it would pull the backend from under the work it is doing) and logged."""
        deadline = None if timeout is None else monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - monotonic())

        while inflight() > 0 and (deadline is None or monotonic() < deadline):
            sleep(0.005)
        if inflight() > 0:
            log.warning("%s: unloading with %d request(s) still in flight after %.1fs",
                        self.label, inflight(), timeout or 0.0)
        scheduler.stop(len(self.members))
        for instance in self.members:
            instance.join(remaining())
        for instance in self.members:
            if instance.is_alive():  # still draining queued work: closing now would pull the backend from under it
                log.warning("%s: instance %s still busy after the timeout; not released", self.label, instance.name)
                continue
            # An inline execution on the event loop holds the instance lock: never close under it.
            wait = remaining()
            if not instance.lock.acquire(timeout=-1 if wait is None else wait):
                log.warning("%s: instance %s still busy; not released", self.label, instance.name)
                continue
            try:
                instance.close()
            finally:
                instance.lock.release()
        self.members = []


def _expired(instance: ModelInstance, timeout_s: float, jobs: list[Job]) -> None:
    instance.expired(jobs, timeout_s)
