"""One model version: its config, instances, scheduler, statistics and state."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Backend, BackendError, ModelSpec
from backends.registry import backend_class
from server.core.instance import CostTracker, ModelInstance, OutputShaper
from server.core.placement import Placement, place_instances, visible_gpus
from server.core.scheduler import DirectScheduler, Job, Scheduler
from server.core.signature import TensorInfo
from server.core.state import ModelState
from server.core.stats import ModelStats
from server.errors import ModelUnavailable
from server.repository.config import config_to_json, tensor_specs
from server.types import InferenceRequest

log = logging.getLogger("nereid.model")


def build_spec(config: mc.ModelConfig, model_dir: Path, version: int) -> ModelSpec:
    version_dir = model_dir / str(version)
    return ModelSpec(
        name=config.name,
        version=version,
        model_dir=model_dir,
        version_dir=version_dir,
        model_file=version_dir / config.default_model_filename,
        max_batch_size=config.max_batch_size,
        inputs=tensor_specs(config.input),
        outputs=tensor_specs(config.output),
        parameters={k: v.string_value for k, v in config.parameters.items()},
        config_json=config_to_json(config),
        instance_count=sum(g.count for g in config.instance_group),
    )


# Models whose measured compute per request is below this run on the event loop
# when an instance is idle: a thread hand-off costs more than they do.
DEFAULT_INLINE_US = 100.0


class Model:
    """A loaded (or loading, or failed) version of a model."""

    def __init__(
        self, config: mc.ModelConfig, model_dir: Path, version: int, inline_us: float = DEFAULT_INLINE_US
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.version_str = str(version)
        self.label = f"'{self.name}' version {version}"
        self.spec = build_spec(config, model_dir, version)
        mbs = config.max_batch_size
        optional = {t.name for t in config.input if t.optional}
        self.inputs = {s.name: TensorInfo.from_spec(s, mbs, s.name in optional) for s in self.spec.inputs}
        self.outputs = {s.name: TensorInfo.from_spec(s, mbs) for s in self.spec.outputs}
        self.required_inputs = sum(1 for i in self.inputs.values() if not i.optional)
        self.stats = ModelStats()
        self.state = ModelState.LOADING
        self.reason = ""
        self.inflight = 0
        self._scheduler: Scheduler = DirectScheduler()
        self._instances: list[ModelInstance] = []
        self._cost = CostTracker()
        self._inline_ns = inline_us * 1000.0

    # -- lifecycle (runs on a loader thread, never on the event loop) --

    def load(self) -> None:
        """Create every instance; on any failure release what was made and raise BackendError."""
        try:
            cls = backend_class(self.config.backend)
            if cls.needs_model_file and not self.spec.model_file.exists():
                raise BackendError(f"model file {self.spec.model_file} does not exist")
            shaper = OutputShaper(self.label, self.outputs, self.inputs)
            for placement in self._placements(cls):
                backend = cls()
                backend.load(replace(self.spec, instance_name=placement.name), placement.device)
                instance = ModelInstance(placement.name, backend, self._scheduler, shaper, self.stats, self._cost)
                self._instances.append(instance)
            self._warm(cls)
        except BaseException as exc:
            self._close_instances()
            self.state = ModelState.UNAVAILABLE
            self.reason = str(exc)
            raise BackendError(str(exc)) from exc
        for instance in self._instances:
            instance.start()
        self.state = ModelState.READY
        self.reason = ""

    def _placements(self, cls: type[Backend]) -> list[Placement]:
        """Where each instance runs (server/core/placement.py); raises PlacementError with a reason."""
        return place_instances(self.config.instance_group, visible_gpus(), cls.supports_gpu)

    def _warm(self, cls: type[Backend]) -> None:
        """Placeholder for `model_warmup` (lifecycle issue); nothing runs yet."""

    def unload(self, timeout: float | None = None) -> None:
        """Stop the instance threads after queued work and release the backends."""
        self.state = ModelState.UNLOADING
        self._scheduler.stop(len(self._instances))
        for instance in self._instances:
            instance.join(timeout)
        self._close_instances()
        self.state = ModelState.UNAVAILABLE
        self.reason = "unloaded"

    def _close_instances(self) -> None:
        for instance in self._instances:
            instance.close()
        self._instances = []

    # -- request path (event loop) --

    async def infer(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """Run the request and return its outputs.

        A cheap model (measured compute per request under the inline budget) runs
        right here on the event loop when nothing is queued and an instance is idle:
        on a busy core a thread hand-off costs several times what such a model
        computes. Everything else is queued for the instances' worker threads.
        """
        if self.state is not ModelState.READY:
            raise ModelUnavailable(f"{self.label} is not at ready state")
        loop = asyncio.get_running_loop()
        started = perf_counter_ns()
        cost = self._cost.per_item_ns
        if cost is not None and cost * request.batch_size <= self._inline_ns and not self._scheduler.pending():
            for instance in self._instances:
                if instance.lock.acquire(blocking=False):
                    try:
                        result, error = instance.execute([Job(request, None, loop, started)])[0]
                    finally:
                        instance.lock.release()
                    if error is not None:
                        raise error
                    return result  # type: ignore[no-any-return]
        future: asyncio.Future[Any] = loop.create_future()
        self.inflight += 1
        try:
            self._scheduler.enqueue(Job(request, future, loop, started))
            return await future
        finally:
            self.inflight -= 1
