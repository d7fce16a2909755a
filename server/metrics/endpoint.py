"""`GET /metrics` on `--metrics-address:--metrics-port`: Triton's families, Nereid's own, and the
process collector of prometheus_client, rendered when scraped.

A small threaded HTTP server of its own (not the gRPC event loop), so a slow scraper never
delays a request and a scrape costs the serving loop nothing but the reads of a few counters.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from server.core.model import Model
from server.metrics.config import MetricsConfig
from server.metrics.custom import custom_families
from server.metrics.exposition import render
from server.metrics.models import model_families
from server.metrics.system import SystemMetrics

log = logging.getLogger("nereid.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NereidCollector:
    """Nereid's own metrics, which Triton has no name for (prometheus_client naming rules)."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Any:
        s = self._sources
        inflight = GaugeMetricFamily("nereid_inflight_requests", "Requests received and not yet answered "
                                     "(every RPC and stream request)")
        inflight.add_metric([], s.inflight())
        yield inflight
        rejected = CounterMetricFamily("nereid_rejected_requests", "Inference requests answered with an error "
                                       "status, by model (empty when unknown) and status code",
                                       labels=["model", "reason"])
        for (model, reason), count in sorted(s.rejections().items()):
            rejected.add_metric([model, reason], count)
        yield rejected
        state = GaugeMetricFamily("nereid_model_state", "1 for the state each model version is in",
                                  labels=["model", "version", "state"])
        for name, version, current in s.states():
            state.add_metric([name, version, current], 1)
        yield state
        failures = CounterMetricFamily("nereid_model_load_failures", "Failed loads of a model (any version)",
                                       labels=["model"])
        for name, count in sorted(s.load_failures().items()):
            failures.add_metric([name], count)
        yield failures
        if s.workers is not None:
            yield from _worker_families(s.workers())


def _worker_families(rows: list[tuple[int, int, int, bool, float, int]]) -> Any:
    """--workers N: per frontend process, calls forwarded, restarts, whether it is up, its CPU and memory."""
    calls = CounterMetricFamily("nereid_worker_calls", "RPCs a frontend process forwarded (--workers)",
                                labels=["worker"])
    restarts = CounterMetricFamily("nereid_worker_restarts", "Times a frontend process was restarted after it "
                                   "exited unexpectedly (--workers)", labels=["worker"])
    up = GaugeMetricFamily("nereid_worker_up", "1 while a frontend process runs (--workers)", labels=["worker"])
    cpu = CounterMetricFamily("nereid_worker_cpu_seconds", "User and system CPU time of a frontend process "
                              "(--workers; process_cpu_seconds_total is the owner's)", labels=["worker"])
    memory = GaugeMetricFamily("nereid_worker_resident_memory_bytes", "Resident memory of a frontend process "
                               "(--workers)", labels=["worker"])
    for index, count, restarted, running, seconds, rss in rows:
        calls.add_metric([str(index)], count)
        restarts.add_metric([str(index)], restarted)
        up.add_metric([str(index)], 1 if running else 0)
        cpu.add_metric([str(index)], seconds)
        memory.add_metric([str(index)], rss)
    yield calls
    yield restarts
    yield up
    yield cpu
    yield memory


class MetricSources:
    """What the metrics read, as callables, so this package imports neither the servicer nor the manager."""

    def __init__(self, models: Callable[[], list[Model]], inflight: Callable[[], int],
                 rejections: Callable[[], dict[tuple[str, str], int]],
                 states: Callable[[], list[tuple[str, str, str]]], load_failures: Callable[[], dict[str, int]],
                 workers: Callable[[], list[tuple[int, int, int, bool, float, int]]] | None = None) -> None:
        self.models = models
        self.inflight = inflight
        self.rejections = rejections
        self.states = states
        self.load_failures = load_failures
        self.workers = workers  # (index, calls, restarts, up, CPU s, RSS) per frontend process, with --workers


class MetricsEndpoint:
    def __init__(self, address: str, port: int, config: MetricsConfig, sources: MetricSources,
                 system: SystemMetrics | None) -> None:
        self.config = config
        self.sources = sources
        self.system = system
        self.registry = CollectorRegistry()
        self.registry.register(ProcessCollector(registry=None))  # type: ignore[arg-type]
        self.registry.register(NereidCollector(sources))  # type: ignore[arg-type]
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = endpoint.text().encode("utf-8")
                except Exception:  # a scrape must not take the endpoint down
                    log.exception("rendering metrics failed")
                    self.send_error(500, "rendering metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
                return

        host = address.strip("[]")
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer
        if ":" in host:
            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = V6
        self._server = server_class((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="nereid-metrics", daemon=True)

    def text(self) -> str:
        families = model_families(self.sources.models(), self.config)
        if self.system is not None:
            families += self.system.families()
        families += custom_families()  # what Python models created with pb_utils.MetricFamily
        return render(families) + generate_latest(self.registry).decode("utf-8")

    def start(self) -> None:
        self._thread.start()
        if self.system is not None:
            self.system.start()

    def stop(self) -> None:
        if self.system is not None:
            self.system.stop()
        self._server.shutdown()
        self._server.server_close()
