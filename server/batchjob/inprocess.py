"""Scoring in this process: the server's own repository manager loads the model (same config
normalisation, backends, instances and dynamic batcher as `nereid serve`), and requests go to
`Model.infer` on this event loop, exactly as the gRPC servicer sends them, without the wire."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from server.batchjob.errors import BatchError
from server.batchjob.target import Target, TensorSig
from server.errors import NereidError
from server.types import InferenceRequest


class InProcessScorer:
    def __init__(self, repositories: list[Path], backend_config: dict[str, dict[str, str]] | None = None) -> None:
        for repository in repositories:
            if not repository.is_dir():
                raise BatchError(f"model repository '{repository}' is not a directory")
        self._repositories = tuple(p.resolve() for p in repositories)
        self._backend_config = backend_config or {}
        self._manager: Any = None
        self._model: Any = None
        self.target: Target | None = None

    async def open(self, model: str, version: str) -> Target:
        from server.repository.manager import RepositoryManager
        from server.settings import Settings

        settings = Settings(model_repositories=self._repositories, model_control_mode="explicit",
                            load_models=(model,), allow_metrics=False, allow_http=False,
                            backend_config=self._backend_config, model_queue_limit=0)
        loop = asyncio.get_running_loop()
        self._manager = RepositoryManager(settings)
        self._manager.bind_loop(loop)
        # Loads on a loader thread; the registry's swap runs on this loop, and load_startup
        # waits for it (registry._on_loop), so the model is in the registry when this returns.
        await loop.run_in_executor(None, self._manager.load_startup)
        try:
            self._model = self._manager.get(model, version)
        except NereidError as exc:
            raise BatchError(f"model '{model}' in {[str(p) for p in self._repositories]}: {exc}") from None
        m = self._model
        mbs = int(m.config.max_batch_size)

        def sig(info: Any) -> TensorSig:
            return TensorSig(info.name, info.datatype, tuple(info.dims))

        self.target = Target(model, m.version_str, mbs, tuple(sig(i) for i in m.inputs.values()),
                             tuple(sig(o) for o in m.outputs.values()),
                             frozenset(name for name, info in m.inputs.items() if info.optional))
        return self.target

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self._model
        batch = 1
        try:
            for name, array in inputs.items():
                batch = model.inputs[name].check_shape(array.shape, model.name)
            outputs = await model.infer(InferenceRequest(inputs=inputs, batch_size=batch))
        except NereidError as exc:
            raise BatchError(f"model '{model.name}': {exc}") from None
        return {name: np.asarray(outputs[name]) for name in model.outputs}

    async def close(self) -> None:
        if self._manager is not None:
            loop = asyncio.get_running_loop()
            self._manager.close()
            await loop.run_in_executor(None, self._manager.unload_all, 5.0)
