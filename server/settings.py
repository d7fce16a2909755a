"""One typed settings object. Flag names follow tritonserver's where they exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

INT32_MAX = 2**31 - 1
CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True)
class Settings:
    model_repositories: tuple[Path, ...]
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    # Triton (and tritonclient) allow messages up to INT32_MAX; grpcio's default is 4 MiB.
    grpc_max_message_bytes: int = INT32_MAX
    disable_auto_complete_config: bool = False
    strict_readiness: bool = True
    exit_timeout_secs: float = 30.0
    log_verbose: int = 0
    metrics_port: int = 0
    # Compute budget (µs per request, measured) under which a model runs on the event
    # loop instead of a worker thread when an instance is idle; 0 disables.
    inline_compute_us: float = 100.0
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
    # backend name -> {setting: value}; "" holds settings given for every backend.
    backend_config: dict[str, dict[str, str]] = field(default_factory=dict)

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
