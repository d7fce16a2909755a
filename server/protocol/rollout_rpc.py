"""The rollout control service (`nereid.Rollout`: Status, Promote, Abort) and sticky keys.

A separate gRPC service on the inference port, beside GRPCInferenceService (which has no
verb for this). Requests and responses are small JSON documents, so `nereid rollout` and
any grpc client can call it without generated code:

    /nereid.Rollout/Status   {"model": "m"}                 -> the rollout's state
    /nereid.Rollout/Promote  {"model": "m", "version": 2}   -> version 2 takes 100%
    /nereid.Rollout/Abort    {"model": "m"}                 -> every canary to 0

Its state lives in the registry (server/rollout/), the process that owns the models.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.errors import InvalidInput, ModelNotFound
from server.protocol import handlers
from server.repository.registry import ModelRegistry
from server.rollout.state import ModelRollout

ROLLOUT_SERVICE = "nereid.Rollout"
ROLLOUT_METHODS = ("Status", "Promote", "Abort")  # unary, JSON bodies (server/workers forwards them)


def sticky_key(rollout: ModelRollout, parameters: Any, metadata: Any) -> str | None:
    """The client's sticky key: the request parameter named in the policy, else the metadata key."""
    policy = rollout.policy
    if policy.sticky_parameter and policy.sticky_parameter in parameters:
        param = parameters[policy.sticky_parameter]
        which = param.WhichOneof("parameter_choice")
        if which:
            return str(getattr(param, which))
    if policy.sticky_metadata and metadata:
        for key, value in metadata:
            if key == policy.sticky_metadata:
                return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
    return None


class RolloutService:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def _rollout(self, body: bytes) -> tuple[ModelRollout, dict[str, Any]]:
        try:
            request = json.loads(body or b"{}")
        except ValueError as exc:
            raise InvalidInput(f"{ROLLOUT_SERVICE}: the request must be a JSON object: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("model"), str):
            raise InvalidInput(f'{ROLLOUT_SERVICE}: expected {{"model": "<name>"}}')
        name = request["model"]
        self.registry.entry(name)  # NOT_FOUND for an unknown model
        rollout = self.registry.rollouts.get(name)
        if rollout is None:
            why = self.registry.rollouts.errors.get(name, "it has no rollout.yaml")
            raise ModelNotFound(f"model '{name}' has no rollout: {why}")
        return rollout, request

    def _answer(self, rollout: ModelRollout, **extra: Any) -> bytes:
        status = rollout.status(self.registry.rollouts.ready(rollout.name))
        status.update(extra)
        return json.dumps(status).encode()

    async def status(self, body: bytes, context: Any) -> bytes:
        rollout, _ = self._rollout(body)
        return self._answer(rollout)

    async def promote(self, body: bytes, context: Any) -> bytes:
        rollout, request = self._rollout(body)
        version = request.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise InvalidInput(f"{ROLLOUT_SERVICE}/Promote: 'version' must be an integer, got {version!r}")
        promoted = rollout.promote(version)
        return self._answer(rollout, promoted=promoted)

    async def abort(self, body: bytes, context: Any) -> bytes:
        rollout, _ = self._rollout(body)
        stopped = rollout.abort()
        return self._answer(rollout, aborted=stopped)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        methods: dict[str, Callable[[bytes, Any], Awaitable[bytes]]] = dict(
            zip(ROLLOUT_METHODS, (self.status, self.promote, self.abort), strict=True))
        return {name: handlers.unary(f"{ROLLOUT_SERVICE}/{name}", fn, None, None) for name, fn in methods.items()}
