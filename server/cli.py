"""The `nereid` command: argv -> Settings -> run. The parser is built on call, never at import."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server import __version__, rollout_cli
from server.batchjob.args import add_batch_parser
from server.core.response_cache import ResponseCache, parse_cache_config
from server.logs import FORMATS, LogState
from server.logs import configure as configure_logging
from server.metrics.config import parse_metrics_config
from server.protocol.ratelimit import parse_rate
from server.repository.objstore import check_urls, is_remote
from server.settings import (
    CONTROL_MODES,
    DEFAULT_MAX_MESSAGE_BYTES,
    INT32_MAX,
    RESTRICTED_PROTOCOL_GROUPS,
    Settings,
    parse_backend_config,
    parse_restricted_apis,
    parse_restricted_protocols,
)
from server.tracing.config import parse_trace_config


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        from server.workers.pool import usable_cores

        return usable_cores()
    return _int_at_least(1)(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got '{text}'")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, with a message naming what was given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'")
        return value

    return parse


_positive_int = _int_at_least(1)


_non_negative_int = _int_at_least(0)


def _max_message(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > INT32_MAX:
        raise argparse.ArgumentTypeError(f"expected at most {INT32_MAX} (gRPC's limit), got '{text}'")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'")
    return value


def _rate(text: str) -> str:
    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_log_flags(serve: argparse.ArgumentParser) -> None:
    """tritonserver's logging flags (server/logs.py); LogSettings changes them at run time."""
    serve.add_argument("--log-verbose", type=_non_negative_int, default=0, metavar="N",
                       help="verbose logging: 1 adds a line per request and per batch, 2 grpcio's own (default 0)")
    serve.add_argument("--log-info", type=_bool, default=True, metavar="BOOL", help="info lines (default true)")
    serve.add_argument("--log-warning", type=_bool, default=True, metavar="BOOL",
                       help="warning lines (default true)")
    serve.add_argument("--log-error", type=_bool, default=True, metavar="BOOL", help="error lines (default true)")
    serve.add_argument("--log-format", choices=FORMATS, default="default",
                       help="default (Triton's layout), ISO8601, or json: one object per line (default default)")
    serve.add_argument("--log-file", default="", metavar="PATH", help="write the log here instead of stderr")


def _add_trace_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--trace-config", action="append", default=[], metavar="[MODE,]KEY=VALUE",
                       help="tracing as tritonserver: level=TIMESTAMPS, rate=N (one request in N), count=N, "
                       "mode=opentelemetry, opentelemetry,url=HOST:PORT/v1/traces, opentelemetry,resource=K=V; "
                       "repeatable (docs/OBSERVABILITY.md)")


def _add_metrics_flags(serve: argparse.ArgumentParser) -> None:
    """Prometheus metrics with tritonserver's flag names (docs/OBSERVABILITY.md)."""
    serve.add_argument("--allow-metrics", type=_bool, default=True, metavar="BOOL",
                       help="serve Prometheus metrics on --metrics-address:--metrics-port (default true)")
    serve.add_argument("--allow-cpu-metrics", type=_bool, default=True, metavar="BOOL",
                       help="include nv_cpu_* metrics (default true)")
    serve.add_argument("--allow-gpu-metrics", type=_bool, default=True, metavar="BOOL",
                       help="include nv_gpu_* metrics through NVML where a GPU exists (default true)")
    serve.add_argument("--metrics-address", default="0.0.0.0", help="metrics address to bind (default 0.0.0.0)")
    serve.add_argument("--metrics-port", type=_int_at_least(0), default=8002,
                       help="metrics port, GET /metrics; 0 picks a free one (default 8002)")
    serve.add_argument("--metrics-interval-ms", type=_positive_int, default=2000, metavar="MS",
                       help="how often machine metrics (CPU, GPU) are read (default 2000)")
    serve.add_argument("--metrics-config", action="append", default=[], metavar="KEY=VALUE",
                       help="counter_latencies, histogram_latencies, summary_latencies (true/false), "
                       "summary_quantiles, histogram_buckets_ms; repeatable")


def _add_overload_flags(serve: argparse.ArgumentParser) -> None:
    """Overload and faults (docs/SECURITY.md): Nereid's own flags; Triton has no equivalents."""
    serve.add_argument("--model-queue-limit", type=_non_negative_int, default=1000, metavar="N",
                       help="requests that may wait for a model version's instances where its config sets no "
                       "max_queue_size; more are refused UNAVAILABLE (0: unbounded, as Triton; default 1000)")
    serve.add_argument("--max-inflight-requests", type=_non_negative_int, default=4096, metavar="N",
                       help="inference requests in flight in the whole server; more are refused "
                       "RESOURCE_EXHAUSTED (0: no cap; default 4096)")
    serve.add_argument("--rate-limit-per-client", type=_rate, default=None, metavar="RATE[:BURST]",
                       help="requests per second each client may send each model (token bucket; a model's "
                       "rate_limit_per_client parameter overrides it); off by default")
    serve.add_argument("--rate-limit-client-header", default="", metavar="NAME",
                       help="request header that names the client for rate limits (else its TLS client "
                       "certificate, else its IP address)")
    serve.add_argument("--model-execution-timeout-secs", type=_non_negative_float, default=0.0, metavar="S",
                       help="answer DEADLINE_EXCEEDED when an execution runs longer, and stop it if the backend "
                       "can (Python models); a model's execution_timeout_ms parameter overrides it (0: none)")
    serve.add_argument("--model-failure-threshold", type=_non_negative_int, default=0, metavar="N",
                       help="failed executions in a row after which an instance is retired; with none left the "
                       "version is UNAVAILABLE until loaded again; a model's failure_threshold parameter "
                       "overrides it (default 0: never, since a client could push a model that fails on "
                       "some inputs offline)")


def _add_lifecycle_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                       help="none: load everything at startup; poll: follow the repository on disk; "
                       "explicit: load --load-model and the load/unload RPCs (default none)")
    serve.add_argument("--repository-poll-secs", type=_positive_float, default=15.0,
                       help="seconds between repository scans in poll mode; fractions allowed (default 15)")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="explicit mode: model to load at startup (repeatable; '*' loads every model)")
    serve.add_argument("--model-load-thread-count", type=_positive_int, default=4,
                       help="threads that load models, several models at once (default 4)")
    serve.add_argument("--model-load-retry-count", type=_non_negative_int, default=0,
                       help="times a failed model load is tried again before the model is UNAVAILABLE (default 0)")


def _add_object_store_flags(serve: argparse.ArgumentParser) -> None:
    """Repositories on object storage (docs/LIFECYCLE.md): Nereid's own flags."""
    serve.add_argument("--model-repository-cache", type=Path, default=None, metavar="DIR",
                       help="folder for the local mirrors of s3:// and gs:// repositories, emptied at startup "
                       "(default: a private temporary folder)")
    serve.add_argument("--model-repository-ready-marker", default="", metavar="NAME",
                       help="a version folder on object storage is taken only once it holds an object NAME "
                       "(upload it last); by default a version is taken once its listing stays the same for a poll")


def _object_store_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The object-store part of Settings; a bad URL or a missing client library stops here."""
    urls = tuple(p for p in args.model_repository if is_remote(p))
    try:
        check_urls(urls, args.model_repository_ready_marker)
    except ValueError as exc:
        raise SystemExit(f"nereid: {exc}") from None
    return {"object_store_repositories": urls, "model_repository_cache": args.model_repository_cache,
            "model_repository_ready_marker": args.model_repository_ready_marker}


def _add_security_flags(serve: argparse.ArgumentParser) -> None:
    """TLS and access-control flags, named and valued as tritonserver's (docs/SECURITY.md)."""
    serve.add_argument("--grpc-use-ssl", type=_bool, default=False, metavar="BOOL",
                       help="serve gRPC over TLS with --grpc-server-cert/--grpc-server-key (default false)")
    serve.add_argument("--grpc-use-ssl-mutual", type=_bool, default=None, metavar="BOOL",
                       help="mutual TLS: also require a client certificate signed by --grpc-root-cert; "
                       "given at all, it turns TLS on, as in tritonserver (default false)")
    serve.add_argument("--grpc-server-cert", type=Path, metavar="FILE", help="PEM server certificate (chain)")
    serve.add_argument("--grpc-server-key", type=Path, metavar="FILE", help="PEM private key of the server certificate")
    serve.add_argument("--grpc-root-cert", type=Path, metavar="FILE",
                       help="PEM CA certificate(s) that client certificates must chain to (mutual TLS)")
    serve.add_argument("--grpc-restricted-protocol", action="append", default=[],
                       metavar="<protocol>[,<protocol>...]:<key>=<value>",
                       help="calls to these protocols need header triton-grpc-protocol-<key>: <value>; repeatable; "
                       f"protocols: {', '.join(RESTRICTED_PROTOCOL_GROUPS)}")


def _add_platform_flags(serve: argparse.ArgumentParser) -> None:
    """Triton's SageMaker and Vertex AI listeners (docs/PLATFORMS.md); ports default from the
    platforms' environment (SAGEMAKER_BIND_TO_PORT, AIP_HTTP_PORT), else 8080."""
    serve.add_argument("--allow-sagemaker", type=_bool, default=False, metavar="BOOL",
                       help="serve SageMaker's /ping and /invocations (default false)")
    serve.add_argument("--sagemaker-port", type=_int_at_least(0), default=None,
                       help="SageMaker port (default $SAGEMAKER_BIND_TO_PORT, else 8080)")
    serve.add_argument("--allow-vertex-ai", type=_bool, default=None, metavar="BOOL",
                       help="serve Vertex AI's $AIP_HEALTH_ROUTE and $AIP_PREDICT_ROUTE (default true when "
                       "AIP_MODE=PREDICTION, as Triton)")
    serve.add_argument("--vertex-ai-port", type=_int_at_least(0), default=None,
                       help="Vertex AI port (default $AIP_HTTP_PORT, else 8080)")
    serve.add_argument("--vertex-ai-default-model", default="",
                       help="the model the predict route serves (default: the only model)")


def _env_port(name: str) -> int | None:
    """A port from the platform's environment (SAGEMAKER_BIND_TO_PORT, AIP_HTTP_PORT), checked."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"{name} must be a port number (0-65535), got '{text}'")
    return int(text)


def _platform_settings(args: argparse.Namespace) -> dict[str, Any]:
    env = os.environ
    sagemaker_port = args.sagemaker_port if args.sagemaker_port is not None else _env_port("SAGEMAKER_BIND_TO_PORT")
    vertex_port = args.vertex_ai_port if args.vertex_ai_port is not None else _env_port("AIP_HTTP_PORT")
    allow_vertex = args.allow_vertex_ai
    if allow_vertex is None:
        allow_vertex = env.get("AIP_MODE", "") == "PREDICTION"
    predict, health = env.get("AIP_PREDICT_ROUTE", ""), env.get("AIP_HEALTH_ROUTE", "")
    if allow_vertex and not (predict and health):  # Triton's startup errors
        raise ValueError(f"{'AIP_PREDICT_ROUTE' if not predict else 'AIP_HEALTH_ROUTE'} is not defined for "
                         "Vertex AI endpoint")
    return {"allow_sagemaker": args.allow_sagemaker,
            "sagemaker_port": 8080 if sagemaker_port is None else sagemaker_port,
            "sagemaker_default_model": env.get("SAGEMAKER_TRITON_DEFAULT_MODEL_NAME", ""),
            "allow_vertex_ai": allow_vertex, "vertex_ai_port": 8080 if vertex_port is None else vertex_port,
            "vertex_ai_default_model": args.vertex_ai_default_model,
            "vertex_ai_predict_route": predict, "vertex_ai_health_route": health}


def _add_validate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    validate = sub.add_parser("validate", help="check a model repository without serving it")
    validate.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="model repository path(s)")
    validate.add_argument("--no-load", action="store_true",
                          help="check configs and files only; do not load the models on this machine")
    validate.add_argument("--disable-auto-complete-config", action="store_true",
                          help="do not fill in missing inputs/outputs/max_batch_size from model files")
    validate.add_argument("--backend-config", action="append", default=[],
                          help="[<backend>,]<key>=<value>, as for serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nereid", description="Triton-compatible gRPC model server")
    parser.add_argument("--version", action="version", version=f"nereid {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve a model repository over gRPC")
    rollout_cli.add_parser(sub)
    serve.add_argument("--model-repository", action="append", required=True, metavar="PATH|URL",
                       help="model repository: a path, s3://[host:port/]bucket/prefix or gs://bucket/prefix "
                       "(repeatable)")
    serve.add_argument("--grpc-address", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port; 0 picks a free one (default 8001)")
    serve.add_argument("--allow-grpc", type=_bool, default=True, metavar="BOOL", help="serve gRPC (default true)")
    serve.add_argument("--allow-http", type=_bool, default=True, metavar="BOOL",
                       help="serve KServe v2 HTTP/REST (default true; docs/HTTP.md)")
    serve.add_argument("--http-address", default="0.0.0.0", help="HTTP address to bind (default 0.0.0.0)")
    serve.add_argument("--http-port", type=_int_at_least(0), default=8000,
                       help="HTTP port; 0 picks a free one (default 8000)")
    serve.add_argument("--http-restricted-api", action="append", default=[],
                       metavar="<api>[,<api>...]:<key>=<value>",
                       help="HTTP requests to these APIs need header <key>: <value> (else 403); repeatable; "
                       f"APIs: {', '.join(RESTRICTED_PROTOCOL_GROUPS)}")
    _add_platform_flags(serve)
    serve.add_argument("--grpc-max-message-bytes", type=_max_message, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest gRPC message accepted or sent, up to 2147483647 (Triton's limit); a "
                       "request costs about 3x its size while it is received (default 536870912, 512 MiB)")
    serve.add_argument("--disable-auto-complete-config", action="store_true",
                       help="do not fill in missing inputs/outputs/max_batch_size from model files")
    serve.add_argument("--strict-readiness", type=_bool, default=True,
                       help="ready only when every model is ready (default true)")
    serve.add_argument("--exit-timeout-secs", type=float, default=30.0,
                       help="how long shutdown waits for in-flight requests (default 30)")
    serve.add_argument("--lame-duck-secs", type=float, default=5.0,
                       help="after SIGTERM readiness goes off at once, but requests that still arrive are "
                       "served until none has arrived for 1 s, for at most this long (before the exit "
                       "timeout starts); then new ones are refused (UNAVAILABLE) while the rest finish. "
                       "0 refuses at once, as Triton (default 5)")
    serve.add_argument("--inline-compute-us", type=float, default=100.0,
                       help="models measured below this many µs per request run on the event loop when an "
                       "instance is idle, saving a thread hand-off; 0 disables (default 100)")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="gRPC frontend processes sharing the port, all forwarding to the one process that "
                       "owns the models; auto = the usable cores; 1 serves everything in one process "
                       "(default 1; docs/ARCHITECTURE.md)")
    serve.add_argument("--connection-balance", choices=("round-robin", "hash"), default="round-robin",
                       help="with --workers: spread new connections over the frontends in turn (an eBPF "
                       "program on the port; where the kernel refuses it, its hash) or by the kernel's hash "
                       "of addresses and ports (default round-robin)")
    serve.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                       help="event loop: uvloop is faster; auto uses it when installed (default auto)")
    serve.add_argument("--backend-config", action="append", default=[],
                       help="[<backend>,]<key>=<value>, e.g. onnxruntime,default-max-batch-size=8")
    serve.add_argument("--cache-config", action="append", default=[], metavar="<cache>,<key>=<value>",
                       help="response cache, as Triton: local,size=BYTES (shared by every model whose config "
                       "has response_cache { enable: true })")
    serve.add_argument("--response-cache-byte-size", type=int, default=None, metavar="BYTES",
                       help="deprecated (as in Triton): the same as --cache-config local,size=BYTES")
    _add_lifecycle_flags(serve)
    _add_object_store_flags(serve)
    _add_security_flags(serve)
    _add_overload_flags(serve)
    _add_metrics_flags(serve)
    _add_log_flags(serve)
    _add_trace_flags(serve)
    _add_validate(sub)
    add_batch_parser(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        backend_config = parse_backend_config(args.backend_config)
        restricted = parse_restricted_protocols(args.grpc_restricted_protocol)
        restricted_http = parse_restricted_apis(args.http_restricted_api)
        metrics_config = parse_metrics_config(args.metrics_config)
        trace_config = parse_trace_config(args.trace_config)
        cache_bytes = parse_cache_config(args.cache_config, args.response_cache_byte_size)
        platforms = _platform_settings(args)
    except ValueError as exc:
        raise SystemExit(f"nereid: {exc}") from exc
    mutual = bool(args.grpc_use_ssl_mutual)
    return Settings(
        model_repositories=tuple(Path(p).resolve() for p in args.model_repository if not is_remote(p)),
        **_object_store_settings(args),
        grpc_address=args.grpc_address,
        grpc_port=args.grpc_port,
        allow_grpc=args.allow_grpc,
        allow_http=args.allow_http,
        http_address=args.http_address,
        http_port=args.http_port,
        **platforms,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        disable_auto_complete_config=args.disable_auto_complete_config,
        strict_readiness=args.strict_readiness,
        exit_timeout_secs=args.exit_timeout_secs,
        lame_duck_secs=args.lame_duck_secs,
        log=LogState(verbose=args.log_verbose, info=args.log_info, warning=args.log_warning, error=args.log_error,
                     format=args.log_format, file=args.log_file),
        allow_metrics=args.allow_metrics,
        allow_cpu_metrics=args.allow_cpu_metrics,
        allow_gpu_metrics=args.allow_gpu_metrics,
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
        metrics_interval_ms=args.metrics_interval_ms,
        metrics_config=metrics_config,
        trace_config=trace_config,
        inline_compute_us=args.inline_compute_us,
        workers=args.workers,
        connection_balance=args.connection_balance,
        event_loop=args.event_loop,
        backend_config=backend_config,
        model_control_mode=args.model_control_mode,
        repository_poll_secs=args.repository_poll_secs,
        load_models=tuple(args.load_model),
        model_load_thread_count=args.model_load_thread_count,
        model_load_retry_count=args.model_load_retry_count,
        # tritonserver turns TLS on whenever --grpc-use-ssl-mutual is given, and mutual wins.
        grpc_use_ssl=args.grpc_use_ssl or args.grpc_use_ssl_mutual is not None,
        grpc_use_ssl_mutual=mutual,
        grpc_server_cert=args.grpc_server_cert,
        grpc_server_key=args.grpc_server_key,
        grpc_root_cert=args.grpc_root_cert,
        grpc_restricted_protocols=restricted,
        http_restricted_apis=restricted_http,
        model_queue_limit=args.model_queue_limit,
        max_inflight_requests=args.max_inflight_requests,
        rate_limit_per_client=args.rate_limit_per_client or "",
        rate_limit_client_header=args.rate_limit_client_header,
        model_execution_timeout_secs=args.model_execution_timeout_secs,
        model_failure_threshold=args.model_failure_threshold,
        response_cache=ResponseCache(cache_bytes) if cache_bytes else None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h", "--version"):
        argv.insert(0, "serve")  # `nereid --model-repository=...` works like tritonserver
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args)
    if args.command == "rollout":
        return rollout_cli.run(args)
    if args.command == "batch":
        from server.batchjob.job import run_batch

        return run_batch(args)
    if args.command != "serve":
        parser.print_help()
        return 2
    settings = settings_from_args(args)
    if settings.workers > 1:  # the frontends are started with the same command line
        settings = dataclasses.replace(settings, serve_argv=tuple(argv[1:]))
    try:
        configure_logging(settings.log)
    except OSError as exc:
        raise SystemExit(f"nereid: cannot open --log-file '{settings.log.file}': {exc.strerror or exc}") from None
    from server.app import run
    from server.protocol.tls import TLSConfigError, server_credentials

    try:
        server_credentials(settings)  # refuse bad TLS files before anything starts
        return run(settings)
    except TLSConfigError as exc:
        raise SystemExit(f"nereid: {exc}") from None


def _validate(args: argparse.Namespace) -> int:
    try:
        backend_config = parse_backend_config(args.backend_config)
    except ValueError as exc:
        raise SystemExit(f"nereid: {exc}") from exc
    logging.basicConfig(level=logging.CRITICAL)  # problems are printed as lines, not logged
    settings = Settings(
        model_repositories=tuple(p.resolve() for p in args.paths),
        disable_auto_complete_config=args.disable_auto_complete_config,
        backend_config=backend_config,
    )
    from server.validate import run_validate

    return run_validate(settings, load=not args.no_load)


if __name__ == "__main__":
    sys.exit(main())
