"""Scoring through a running server: tritonclient's asyncio gRPC client, many requests in flight."""

from __future__ import annotations

from typing import Any

import numpy as np

from server.batchjob.errors import BatchError
from server.batchjob.target import Target, TensorSig


def _message(exc: Exception) -> str:
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return str(text or exc)


class RemoteScorer:
    """One gRPC channel to `url`; `infer` may be awaited by many tasks at once."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc.aio as grpcclient

        self._mod = grpcclient
        self._url = url
        self._client: Any = None
        self.target: Target | None = None
        self._version = ""
        self._requested: list[Any] = []

    async def open(self, model: str, version: str) -> Target:
        from tritonclient.utils import InferenceServerException

        self._client = self._mod.InferenceServerClient(self._url)
        try:
            meta = await self._client.get_model_metadata(model, version)
            config = (await self._client.get_model_config(model, version)).config
        except InferenceServerException as exc:
            raise BatchError(f"model '{model}' on {self._url}: {_message(exc)}") from None
        mbs = int(config.max_batch_size)

        def sig(tensor: Any) -> TensorSig:
            dims = tuple(int(d) for d in tensor.shape)
            return TensorSig(tensor.name, tensor.datatype, dims[1:] if mbs > 0 else dims)

        self._version = version
        self.target = Target(model, version, mbs, tuple(sig(t) for t in meta.inputs),
                             tuple(sig(t) for t in meta.outputs),
                             frozenset(t.name for t in config.input if t.optional))
        self._requested = [self._mod.InferRequestedOutput(o.name) for o in self.target.outputs]
        return self.target

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        assert self.target is not None
        wire = []
        for sig in self.target.inputs:
            if sig.name not in inputs:
                continue
            array = inputs[sig.name]
            tensor = self._mod.InferInput(sig.name, list(array.shape), sig.datatype)
            tensor.set_data_from_numpy(array)
            wire.append(tensor)
        try:
            result = await self._client.infer(self.target.name, wire, model_version=self._version,
                                              outputs=self._requested)
        except InferenceServerException as exc:
            raise BatchError(f"model '{self.target.name}': {_message(exc)}") from None
        return {o.name: result.as_numpy(o.name) for o in self.target.outputs}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
