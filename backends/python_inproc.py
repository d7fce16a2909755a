"""Python models run inside the server's process: the opt-in `nereid_in_process` mode.

A model whose config has `parameters { key: "nereid_in_process" value: { string_value: "true" } }`
skips the stub process (backends/python.py): each instance imports its own copy of `model.py`
(backends/python_modules.py) and the core calls `TritonPythonModel.execute` on the instance's
thread, or on the event loop when it is measured as cheap as other in-process backends
(server/core/execution.py), without the round trip to a stub. The model sees the same
`triton_python_backend_utils` objects and the same `execute` semantics as in a stub
(backends/python_calls.py): request ids, parameters and requested outputs, error responses that
fail one request, an exception that fails the call, response senders, `finalize` on unload.

What a stub gives and this mode cannot, docs/BACKENDS.md says: no crash isolation (a segfault or
`os._exit` in the model ends the server), the model's Python holds the server's GIL while it runs,
and the module shares the server's interpreter. Refused here: decoupled models (at load), and
business logic scripting (`InferenceRequest.exec` and friends raise when called).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from backends.base import (
    Backend,
    BackendError,
    BackendStatusError,
    Device,
    ModelSpec,
    Outcome,
    Request,
    ResponseOutputs,
)
from backends.python_calls import ExecuteFailed, ModelCalls, describe, pb_utils
from backends.python_config import initialize_args, request_parameters, triton_config_json
from backends.python_decoupled import STATUS_OF_CODE
from backends.python_modules import forget, import_model, model_imports
from backends.python_observe import current_model, metric_owner, release_owned
from backends.python_responses import InferenceResponseSender, ResponseHub

log = logging.getLogger("nereid.python")

IN_PROCESS = "nereid_in_process"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("", "false", "0", "no", "off")
_REMEDY = f"is not supported with {IN_PROCESS}; remove the parameter to run the model in a stub process"


def wants_in_process(spec: ModelSpec) -> bool:
    """Whether the config asks for this mode; BackendError for a value that is neither yes nor no,
    or for a config this mode cannot serve (a decoupled model)."""
    value = str(spec.parameters.get(IN_PROCESS, "")).strip().lower()
    if value in _FALSE:
        return False
    if value not in _TRUE:
        raise BackendError(f"parameter {IN_PROCESS} must be \"true\" or \"false\", got \"{value}\"")
    config = json.loads(spec.config_json or "{}")
    if config.get("model_transaction_policy", {}).get("decoupled"):
        raise BackendError(f"the decoupled transaction policy (model_transaction_policy {{ decoupled: true }}) "
                           f"{_REMEDY}")
    return True


class _NoBls:
    """Business logic scripting needs the stub's connection to the server: refuse it clearly."""

    def _refuse(self, what: str) -> Any:
        raise pb_utils.TritonModelException(f"business logic scripting ({what}) {_REMEDY}")

    def exec(self, request: Any, decoupled: bool) -> Any:
        return self._refuse("InferenceRequest.exec")

    def async_exec(self, request: Any, decoupled: bool) -> Any:
        return self._refuse("InferenceRequest.async_exec")

    def control(self, what: str, body: Any) -> Any:
        return self._refuse({"ready": "pb_utils.is_model_ready", "load": "pb_utils.load_model",
                             "unload": "pb_utils.unload_model"}.get(what, what))


# In the server's process no stub's BLS client is ever installed; this one says why.
pb_utils._BLS = _NoBls()


class InProcessPythonBackend(Backend, ModelCalls):
    """One instance of a Python model, run in the server's process."""

    name = "python"
    default_model_filename = "model.py"
    supports_gpu = True  # as in a stub: the instance's kind and device id are passed on; the model decides
    wants_requests = True

    def load(self, spec: ModelSpec, device: Device) -> None:
        self._label = spec.instance_name or spec.name
        self.model_name = spec.name
        self._outputs = [o.name for o in spec.outputs]
        self._hub = ResponseHub(None)  # the default mode's response senders: one response each
        self._loop = None
        self._async: concurrent.futures.ThreadPoolExecutor | None = None  # where `async def execute` runs
        self.model: Any = None
        self._metrics: set[int] = set()  # handles of the MetricFamily / Metric objects it made
        config_json = triton_config_json(spec.config_json)
        config = json.loads(config_json)
        self.iterative = bool(config.get("sequence_batching", {}).get("iterative_sequence", False))
        try:
            with self._as_model(), model_imports(spec.model_file.parent):
                self._module = import_model(spec.model_file)
                try:
                    self.model = self._module.TritonPythonModel()
                    if hasattr(self.model, "initialize"):
                        self.model.initialize(initialize_args(spec, device, config_json))
                    if not hasattr(self.model, "execute"):
                        raise AttributeError("TritonPythonModel has no execute(requests) method")
                except BaseException:
                    forget(self._module)
                    raise
        except (Exception, SystemExit) as exc:
            release_owned(self._metrics)  # what its import or initialize made before failing
            raise BackendError(f"Python model {spec.model_file} failed to initialize: {describe(exc)}") from exc

    @contextlib.contextmanager
    def _as_model(self) -> Iterator[None]:
        """While the model's code runs: its Logger lines name it, its metrics are its own."""
        token, owner = current_model.set(self.model_name), metric_owner.set(self._metrics)
        try:
            yield
        finally:
            metric_owner.reset(owner)
            current_model.reset(token)

    def execute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """One request, outside the scheduler (warmup)."""
        outcome = self.execute_requests([Request(inputs)])[0]
        if isinstance(outcome, BackendError):
            raise outcome
        return outcome

    def execute_requests(self, requests: Sequence[Request]) -> list[Outcome]:
        Tensor, InferenceRequest, hub = pb_utils.Tensor, pb_utils.InferenceRequest, self._hub
        built, wanted, states = [], [], []
        for index, r in enumerate(requests):
            requested = list(r.requested_outputs) if r.requested_outputs else self._outputs
            parameters, correlation_id, flags = request_parameters(r.parameters)
            request = InferenceRequest(
                model_name=self.model_name, inputs=[Tensor(name, arr) for name, arr in r.inputs.items()],
                requested_output_names=requested, request_id=r.id, parameters=parameters,
                correlation_id=correlation_id, flags=flags,
            )
            names = set(requested)
            state = hub.open(index, names)
            request._sender = InferenceResponseSender(hub, state)
            if r.cancelled is not None:
                request._cancel_probe = r.cancelled
            built.append(request)
            wanted.append(names)
            states.append(state)
        try:
            with self._as_model():
                responses = self._run(built, states)
        except ExecuteFailed as exc:
            raise BackendError(f"python model {self.model_name} raised {exc}") from None
        except SystemExit as exc:  # in a stub it ends the stub; here it must not end the server
            raise BackendError(f"python model {self.model_name} raised SystemExit({exc.code}) in execute") from None
        return [self._outcome(response, names) for response, names in zip(responses, wanted, strict=True)]

    def _outcome(self, response: Any, wanted: set[str]) -> Outcome:
        answer = self._response(response, wanted)
        if isinstance(answer, tuple):  # ("err", message, code)
            _, message, code = answer
            return BackendStatusError(message, STATUS_OF_CODE.get(code, "INTERNAL"))
        outputs = dict(answer)
        parameters = getattr(response, "_parameters", None)
        return ResponseOutputs(outputs, parameters) if parameters else outputs

    def close(self) -> None:
        model, self.model = getattr(self, "model", None), None
        if model is None:
            return
        try:
            if hasattr(model, "finalize"):
                with self._as_model():
                    try:
                        model.finalize()
                    except Exception:
                        log.exception("python model instance %s: finalize() failed", self._label)
        finally:
            release_owned(self._metrics)  # as a stub's exit: even what a module global still holds
            forget(self._module)
            if self._async is not None:
                self._async.shutdown(wait=False)

    def _run_async(self, coroutine: Any) -> Any:
        """An `async def execute`, run to completion as in the stub, but on a thread of its own:
        this instance's caller may be the server's event loop, where another loop cannot run."""
        if self._async is None:
            self._async = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"python-async-{self._label}")
        context = contextvars.copy_context()  # its Logger lines and metrics are still this model's
        return self._async.submit(context.run, ModelCalls._run_async, self, coroutine).result()
