"""OpenTelemetry spans for sampled inference requests, exported over OTLP/HTTP.

A traced request gets a root span `InferRequest` (model, version, request id, status) with
four children: `receive` (reading, parsing and checking the request), `queue` (waiting for an
instance), `compute` (the execution, with events COMPUTE_INPUT_END and COMPUTE_OUTPUT_START)
and `send` (encoding the response until gRPC has sent it). The W3C trace context in the
request's gRPC metadata (`traceparent`, `tracestate`) becomes the root's parent, and a
parent that is sampled is always traced (within `count`); otherwise one request in `rate`
is (per model, Triton's semantics).

Timestamps are taken on the request path as plain integers (`RequestTrace`, filled by the
core); the spans are built once the RPC is done, and exported by a background thread, so a
traced request pays a few microseconds and an untraced one a single attribute check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from server.tracing.config import TraceConfig, TraceSettings, parse_levels

log = logging.getLogger("nereid.tracing")

SETTING_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode")
INSTALL_HINT = "pip install 'nereid[tracing]' (opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)"


class RequestTrace:
    """The timestamps of one traced request (perf_counter nanoseconds)."""

    __slots__ = ("parent", "received", "decoded", "compute", "encoded", "model", "version", "request_id", "status",
                 "offset")

    def __init__(self, parent: Any) -> None:
        self.parent = parent
        self.offset = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch
        self.received = time.perf_counter_ns()
        self.decoded = 0
        self.compute: tuple[int, int, int, int, int] | None = None  # enqueued, started, prepared, executed, done
        self.encoded = 0
        self.model = ""
        self.version = ""
        self.request_id = ""
        self.status = "OK"


class Tracer:
    def __init__(self, config: TraceConfig) -> None:
        self.config = config
        self._global = config.settings
        self._models: dict[str, dict[str, Any]] = {}  # model -> overridden TraceSettings fields
        self._seen: dict[str, int] = {}
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()
        self._otel: Any = None
        self.active = False
        self._refresh()

    # -- settings (TraceSetting RPC) --

    def settings(self, model: str = "") -> TraceSettings:
        overrides = self._models.get(model) if model else None
        return replace(self._global, **overrides) if overrides else self._global

    def update(self, model: str, changes: Mapping[str, list[str]]) -> TraceSettings:
        """Apply TraceSetting changes; an empty value list clears (a model's override, or the global
        value back to the startup one). Raises ValueError naming the key."""
        values: dict[str, Any] = {}
        cleared: list[str] = []
        for key, raw in changes.items():
            if key not in SETTING_KEYS and key != "trace_file":
                raise ValueError(f"unknown trace setting '{key}'; expected one of {', '.join(SETTING_KEYS)}")
            field_name = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count"}.get(key, key)
            if not raw:
                cleared.append(field_name)
                continue
            if key in ("trace_file", "trace_mode"):
                if key == "trace_mode" and raw == ["opentelemetry"]:
                    continue
                raise ValueError(f"'{key}' cannot be set: Nereid traces with mode opentelemetry only")
            if key == "trace_level":
                values["level"] = parse_levels(raw)
                continue
            try:
                number = int(raw[0])
            except ValueError:
                raise ValueError(f"'{key}' expects an integer, got '{raw[0]}'") from None
            if len(raw) != 1 or number < (-1 if key == "trace_count" else 1 if key == "trace_rate" else 0):
                raise ValueError(f"'{key}' expects one integer in range, got {raw}")
            values[field_name] = number
        with self._lock:
            if model:
                overrides = self._models.setdefault(model, {})
                for name in cleared:
                    overrides.pop(name, None)
                overrides.update(values)
                if "count" in values or "count" in cleared:
                    self._remaining.pop(model, None)
            else:
                defaults = self.config.settings
                self._global = replace(self._global, **{n: getattr(defaults, n) for n in cleared}, **values)
                if "count" in values or "count" in cleared:
                    self._remaining.clear()
            self._refresh()
        return self.settings(model)

    def _refresh(self) -> None:
        active = self._global.on or any(self.settings(m).on for m in self._models)
        if active and self._otel is None:
            try:
                self._otel = _OtelExport(self.config)
            except ImportError:
                raise ValueError(f"tracing needs OpenTelemetry: {INSTALL_HINT}") from None
        self.active = active

    # -- per request --

    def start(self, model: str, metadata: Iterable[tuple[str, Any]] | None) -> RequestTrace | None:
        """A trace for this request if it is sampled, else None."""
        settings = self.settings(model)
        if not settings.on:
            return None
        parent, parent_sampled = self._otel.parent(metadata)
        with self._lock:
            seen = self._seen[model] = self._seen.get(model, 0) + 1
            if not parent_sampled and seen % settings.rate:
                return None
            remaining = self._remaining.get(model, settings.count)
            if remaining == 0:
                return None
            if remaining > 0:
                self._remaining[model] = remaining - 1
        return RequestTrace(parent)

    def finish(self, trace: RequestTrace) -> None:
        """Build and hand over the spans (the RPC is done)."""
        try:
            self._otel.export(trace, time.perf_counter_ns())
        except Exception:  # tracing must never fail a request
            log.exception("building a trace failed")

    def shutdown(self) -> None:
        if self._otel is not None:
            self._otel.shutdown()


class _OtelExport:
    """The OpenTelemetry SDK, imported only when some tracing is on."""

    def __init__(self, config: TraceConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        url = config.url if "://" in config.url else f"http://{config.url}"
        resource = Resource.create({"service.name": "nereid", **dict(config.resource)})
        self.provider = TracerProvider(resource=resource)
        batch = {key[len("bsp_"):]: value for key, value in config.batch}
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url), **_bsp_kwargs(batch))  # type: ignore[arg-type]
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("nereid")
        self.propagator = TraceContextTextMapPropagator()
        log.info("tracing: OTLP/HTTP to %s", url)

    def parent(self, metadata: Iterable[tuple[str, Any]] | None) -> tuple[Any, bool]:
        from opentelemetry import trace

        carrier = {k: (v if isinstance(v, str) else v.decode("latin-1")) for k, v in (metadata or ())
                   if k in ("traceparent", "tracestate")}
        if not carrier:
            return None, False
        context = self.propagator.extract(carrier)
        span_context = trace.get_current_span(context).get_span_context()
        return context, bool(span_context.is_valid and span_context.trace_flags.sampled)

    def export(self, t: RequestTrace, done: int) -> None:
        from opentelemetry import trace

        def at(perf_ns: int) -> int:
            return perf_ns + t.offset

        root = self.tracer.start_span("InferRequest", context=t.parent, start_time=at(t.received), attributes={
            "triton.model_name": t.model, "triton.model_version": t.version, "triton.request_id": t.request_id,
            "rpc.grpc.status_code": t.status})
        context = trace.set_span_in_context(root)
        decoded = t.decoded or done
        self.tracer.start_span("receive", context=context, start_time=at(t.received)).end(end_time=at(decoded))
        send_from = decoded
        if t.compute is not None:
            enqueued, started, prepared, executed, finished = t.compute
            self.tracer.start_span("queue", context=context, start_time=at(enqueued)).end(end_time=at(started))
            compute = self.tracer.start_span("compute", context=context, start_time=at(started))
            compute.add_event("COMPUTE_INPUT_END", timestamp=at(prepared))
            compute.add_event("COMPUTE_OUTPUT_START", timestamp=at(executed))
            compute.end(end_time=at(finished))
            send_from = finished
        self.tracer.start_span("send", context=context, start_time=at(send_from)).end(end_time=at(done))
        root.end(end_time=at(done))

    def shutdown(self) -> None:
        self.provider.shutdown()


def _bsp_kwargs(batch: dict[str, int]) -> dict[str, int]:
    """Triton's bsp_* options under the SDK's BatchSpanProcessor argument names."""
    names = {"max_queue_size": "max_queue_size", "schedule_delay": "schedule_delay_millis",
             "max_export_batch_size": "max_export_batch_size"}
    return {names[k]: v for k, v in batch.items() if k in names}
