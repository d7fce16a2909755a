"""Numpy-only identity backend: output i is input i. For tests and docs.

It needs no framework, so most protocol and scheduling tests run without one.
Like Triton's identity backend it honours the `execute_delay_ms` parameter,
which lets tests hold requests in flight (shutdown draining, concurrency).
"""

from __future__ import annotations

import time

import numpy as np

from backends.base import Backend, BackendError, Device, ModelSpec


class IdentityBackend(Backend):
    name = "identity"
    needs_model_file = False

    def load(self, spec: ModelSpec, device: Device) -> None:
        if len(spec.inputs) != len(spec.outputs):
            raise BackendError(
                f"identity model '{spec.name}' needs as many outputs as inputs, "
                f"got {len(spec.inputs)} inputs and {len(spec.outputs)} outputs"
            )
        self._pairs = [(i.name, o.name) for i, o in zip(spec.inputs, spec.outputs, strict=True)]
        try:
            self._delay = float(spec.parameters.get("execute_delay_ms", "0")) / 1000.0
        except ValueError as exc:
            raise BackendError(f"parameter execute_delay_ms must be a number: {exc}") from exc

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._delay:
            time.sleep(self._delay)
        return {out: inputs[inp] for inp, out in self._pairs if inp in inputs}
