"""One typed settings object. Flag names follow tritonserver's where they exist."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from server.logs import LogState
from server.metrics.config import MetricsConfig
from server.tracing.config import TraceConfig

if TYPE_CHECKING:
    from server.core.response_cache import ResponseCache

INT32_MAX = 2**31 - 1
# The default largest gRPC message. grpcio itself peaks at about 3x a message while receiving it
# (docs/BENCHMARKS.md), so a 2 GiB limit (Triton's) lets one request take 6 GiB; 512 MiB keeps a
# request's cost to about 1.5 GiB and still takes the tensors Triton users send. Raise it with
# --grpc-max-message-bytes up to INT32_MAX.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CONTROL_MODES = ("none", "poll", "explicit")

# Triton's restricted protocol groups (server/src/restricted_features.h), in Triton's order.
RESTRICTED_PROTOCOL_GROUPS = (
    "health", "metadata", "inference", "shared-memory", "model-config",
    "model-repository", "statistics", "trace", "logging",
)
# Triton's prefix for the header a restricted group expects (grpc_server.h kRestrictedProtocolHeaderTemplate).
RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"
_HEADER_KEY = re.compile(r"[0-9a-z_.-]+")


@dataclass(frozen=True)
class Restriction:
    """One `--grpc-restricted-protocol` group: calls to these protocol groups must carry
    `header: value`. The value is a secret, so it is kept out of repr (and so out of logs)."""

    groups: tuple[str, ...]
    header: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class Settings:
    model_repositories: tuple[Path, ...]
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    allow_grpc: bool = True
    # KServe v2 HTTP/REST (server/http/, docs/HTTP.md) on the same event loop; 0: a free port, logged.
    allow_http: bool = True
    http_address: str = "0.0.0.0"
    http_port: int = 8000
    # Managed platforms (server/http/platforms.py, docs/PLATFORMS.md), bound on http_address.
    allow_sagemaker: bool = False
    sagemaker_port: int = 8080
    sagemaker_default_model: str = ""  # $SAGEMAKER_TRITON_DEFAULT_MODEL_NAME; "": the only model
    allow_vertex_ai: bool = False
    vertex_ai_port: int = 8080
    vertex_ai_default_model: str = ""  # "": the only model
    vertex_ai_predict_route: str = ""  # $AIP_PREDICT_ROUTE
    vertex_ai_health_route: str = ""  # $AIP_HEALTH_ROUTE
    # Triton (and tritonclient) allow messages up to INT32_MAX; grpcio's default is 4 MiB.
    grpc_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    disable_auto_complete_config: bool = False
    strict_readiness: bool = True
    exit_timeout_secs: float = 30.0
    # After SIGTERM, readiness is off but new requests are still served until none arrives for a
    # second, for at most this long (a "lame duck"): load balancers take a moment to notice.
    # The exit timeout (the drain of what is in flight) starts after it.
    lame_duck_secs: float = 5.0
    log: LogState = field(default_factory=LogState)  # server/logs.py
    # Prometheus metrics (server/metrics/): Triton's flags and families.
    allow_metrics: bool = True
    allow_cpu_metrics: bool = True
    allow_gpu_metrics: bool = True
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002  # 0: a free port, logged
    metrics_interval_ms: int = 2000
    metrics_config: MetricsConfig = field(default_factory=MetricsConfig)
    trace_config: TraceConfig = field(default_factory=TraceConfig)  # --trace-config (server/tracing/)
    # Compute budget (µs per request, measured) under which a model runs on the event
    # loop instead of a worker thread when an instance is idle; 0 disables.
    inline_compute_us: float = 100.0
    # --workers: frontend processes on the gRPC port, forwarding to this one (server/workers/);
    # 1 serves gRPC in this process. serve_argv is the command line they are started with.
    workers: int = 1
    serve_argv: tuple[str, ...] = ()
    # --connection-balance: how new connections are spread over the frontends (workers/balance.py):
    # "round-robin" (an eBPF reuseport program; the kernel's hash where bpf() is not allowed) or "hash".
    connection_balance: str = "round-robin"
    # Overload and faults (server/core/faults.py, docs/SECURITY.md): queued requests per model where
    # the config sets no max_queue_size (0: unbounded, as Triton), requests in flight in the whole
    # server (0: no cap), an execution timeout (0: none; a model's `execution_timeout_ms` parameter
    # overrides it) and the failed executions in a row that retire an instance (0: never; a model's
    # `failure_threshold` parameter overrides it).
    model_queue_limit: int = 1000
    max_inflight_requests: int = 4096
    model_execution_timeout_secs: float = 0.0
    model_failure_threshold: int = 0
    # Per-client token buckets (server/protocol/ratelimit.py): "RATE[:BURST]" or "" (off).
    rate_limit_per_client: str = ""
    rate_limit_client_header: str = ""
    # "auto" (uvloop when installed), "uvloop" (libuv-based; about 9 % more infer/s here) or "asyncio".
    event_loop: str = "auto"
    # Lifecycle (docs/LIFECYCLE.md): "none" loads everything once, "poll" follows the
    # repository on disk, "explicit" loads only --load-model and the load/unload RPCs.
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0
    # Model names to load at startup in explicit mode; "*" means every model.
    load_models: tuple[str, ...] = ()
    # Loader threads: loads run here, never on the event loop, several models at once.
    model_load_thread_count: int = 4
    # Extra attempts for a load that failed (tritonserver's --model-load-retry-count), e.g. a
    # model file on a network filesystem that was briefly unreadable; 0 tries once.
    model_load_retry_count: int = 0
    # Repositories on object storage (docs/LIFECYCLE.md): s3:// and gs:// URLs, each mirrored into a
    # folder under the cache root (None: a private temporary folder); a version on object storage is
    # taken only once it holds the ready marker object, when one is named.
    object_store_repositories: tuple[str, ...] = ()
    model_repository_cache: Path | None = None
    model_repository_ready_marker: str = ""
    # backend name -> {setting: value}; "" holds settings given for every backend.
    backend_config: dict[str, dict[str, str]] = field(default_factory=dict)
    # TLS (docs/SECURITY.md): off unless --grpc-use-ssl or --grpc-use-ssl-mutual; mutual
    # also requires and verifies a client certificate signed by grpc_root_cert.
    grpc_use_ssl: bool = False
    grpc_use_ssl_mutual: bool = False
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    # --grpc-restricted-protocol groups; empty: every protocol is open and no interceptor runs.
    grpc_restricted_protocols: tuple[Restriction, ...] = ()
    # --http-restricted-api groups (server/http/access.py); empty: every HTTP API is open.
    http_restricted_apis: tuple[Restriction, ...] = ()
    # Triton's response cache (--cache-config local,size=N; server/core/response_cache.py): the one
    # cache every model with `response_cache { enable: true }` shares; None: no cache.
    response_cache: ResponseCache | None = field(default=None, compare=False, repr=False)

    def backend_setting(self, backend: str, key: str, default: str) -> str:
        """A `--backend-config` value for `backend`, falling back to the global one."""
        per_backend = self.backend_config.get(backend, {})
        if key in per_backend:
            return per_backend[key]
        return self.backend_config.get("", {}).get(key, default)


def parse_backend_config(values: list[str]) -> dict[str, dict[str, str]]:
    """Parse Triton's `--backend-config=<backend>,<key>=<value>` (backend optional)."""
    result: dict[str, dict[str, str]] = {}
    for raw in values:
        backend, sep, setting = raw.partition(",")
        if not sep:
            backend, setting = "", raw
        key, eq, value = setting.partition("=")
        if not eq or not key:
            raise ValueError(f"--backend-config expects [<backend>,]<key>=<value>, got '{raw}'")
        result.setdefault(backend, {})[key] = value
    return result


def parse_restricted_protocols(values: list[str]) -> tuple[Restriction, ...]:
    """Parse Triton's `--grpc-restricted-protocol=<protocol>[,<protocol>...]:<key>=<value>`
    (repeatable); the header is `triton-grpc-protocol-<key>`. Errors follow Triton's texts
    (command_line_parser.cc ParseRestrictedFeatureOption) but never repeat the value, which is
    a secret."""
    return _parse_restrictions(values, "--grpc-restricted-protocol", "protocol", RESTRICTED_HEADER_PREFIX, "gRPC")


def parse_restricted_apis(values: list[str]) -> tuple[Restriction, ...]:
    """Parse Triton's `--http-restricted-api=<api>[,<api>...]:<key>=<value>` (repeatable): the
    same groups as gRPC, but the header is `<key>` itself, as tritonserver's HTTP server checks it."""
    return _parse_restrictions(values, "--http-restricted-api", "api", "", "HTTP")


def _parse_restrictions(values: list[str], flag: str, noun: str, prefix: str, transport: str,
                        ) -> tuple[Restriction, ...]:
    taken: set[str] = set()
    result = []
    for raw in values:
        names, colon, setting = raw.partition(":")
        key, eq, value = setting.partition("=")
        if not (colon and eq and names and key and value):
            shown = f" Got '{names}:...'" if colon else ""
            raise ValueError(f"{flag} option format is '<{noun}>[,<{noun}>...]:<key>=<value>'." + shown)
        groups = tuple(names.split(","))
        for group in groups:
            if group not in RESTRICTED_PROTOCOL_GROUPS:
                raise ValueError(
                    f"unknown restricted {noun} '{group}'; expected one of {', '.join(RESTRICTED_PROTOCOL_GROUPS)}"
                )
            if group in taken:
                raise ValueError(f"restricted {noun} '{group}' can not be specified in multiple config groups")
            taken.add(group)
        # Header names are case-insensitive and travel lower-case (HTTP/2; the HTTP server
        # lower-cases them), so a key given in capitals could never match otherwise.
        key = key.lower()
        if not _HEADER_KEY.fullmatch(key) or (transport == "gRPC" and key.endswith("-bin")):
            rule = "letters, digits, '-', '_', '.'" + ("; not ending in '-bin'" if transport == "gRPC" else "")
            raise ValueError(f"{flag} key '{key}' is not a usable {transport} header name ({rule})")
        if not all(" " <= char <= "~" for char in value):
            raise ValueError(f"{flag} value for key '{key}' must be printable ASCII (the value is not shown)")
        result.append(Restriction(groups, prefix + key, value))
    return tuple(result)
