"""`--trace-config` as tritonserver spells it, and the settings the TraceSetting RPC reads and changes.

Triton's forms: `--trace-config level=TIMESTAMPS`, `rate=1000` (trace one request in N),
`count=-1` (how many more requests to trace; -1: no limit), `log_frequency=0`,
`mode=opentelemetry`, and the mode-scoped `opentelemetry,url=localhost:4318/v1/traces`,
`opentelemetry,resource=service.name=nereid` (repeatable), `opentelemetry,bsp_max_queue_size=...`,
`opentelemetry,bsp_schedule_delay=...`, `opentelemetry,bsp_max_export_batch_size=...`. Nereid
traces only in `opentelemetry` mode (Triton's own `triton` mode writes a JSON file; Nereid
refuses it with a message rather than silently doing nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
DEFAULT_URL = "localhost:4318/v1/traces"


@dataclass(frozen=True)
class TraceSettings:
    """What TraceSetting reports and changes, globally or for one model."""

    level: tuple[str, ...] = ("OFF",)
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0

    @property
    def on(self) -> bool:
        return any(level != "OFF" for level in self.level)


@dataclass(frozen=True)
class TraceConfig:
    settings: TraceSettings = field(default_factory=TraceSettings)
    mode: str = "opentelemetry"
    url: str = DEFAULT_URL
    resource: tuple[tuple[str, str], ...] = ()
    batch: tuple[tuple[str, int], ...] = ()  # bsp_* options for the batch span processor


def _int(key: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"--trace-config {key}: expected an integer, got '{value}'") from None
    if number < minimum:
        raise ValueError(f"--trace-config {key}: expected an integer >= {minimum}, got '{value}'")
    return number


def parse_levels(values: Sequence[str]) -> tuple[str, ...]:
    levels = tuple(v.strip().upper() for v in values)
    bad = [v for v in levels if v not in LEVELS]
    if bad or not levels:
        raise ValueError(f"trace level must be one of {', '.join(LEVELS)}, got {list(values)}")
    if "OFF" in levels and len(levels) > 1:
        raise ValueError("trace level OFF cannot be combined with other levels")
    return levels


def parse_trace_config(items: Sequence[str]) -> TraceConfig:
    config = TraceConfig()
    settings = config.settings
    levels: list[str] = []
    for item in items:
        scope, comma, rest = item.partition(",")
        if comma and "=" not in scope:  # "opentelemetry,url=..." / "triton,file=..."
            mode_scope, setting = scope.strip(), rest
        else:
            mode_scope, setting = "", item
        key, eq, value = setting.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"--trace-config expects [<mode>,]<setting>=<value>, got '{item}'")
        if mode_scope and mode_scope not in ("opentelemetry", "triton"):
            raise ValueError(f"--trace-config: unknown mode '{mode_scope}'; expected opentelemetry or triton")
        if mode_scope == "triton":
            raise ValueError("--trace-config triton,...: Triton's file trace mode is not supported; "
                             "use mode=opentelemetry (OTLP)")
        if key == "level":
            levels.append(value)
        elif key == "rate":
            settings = replace(settings, rate=_int(key, value, 1))
        elif key == "count":
            settings = replace(settings, count=_int(key, value, -1))
        elif key == "log_frequency":
            settings = replace(settings, log_frequency=_int(key, value, 0))
        elif key == "mode":
            if value != "opentelemetry":
                raise ValueError(f"--trace-config mode={value}: Nereid traces with mode=opentelemetry only")
        elif key == "url":
            config = replace(config, url=value)
        elif key == "resource":
            name, eq2, res_value = value.partition("=")
            if not eq2 or not name:
                raise ValueError(f"--trace-config resource expects <key>=<value>, got '{value}'")
            config = replace(config, resource=config.resource + ((name, res_value),))
        elif key.startswith("bsp_"):
            config = replace(config, batch=config.batch + ((key, _int(key, value, 1)),))
        else:
            raise ValueError(f"--trace-config: unknown setting '{key}'")
    if levels:
        settings = replace(settings, level=parse_levels(levels))
    return replace(config, settings=settings)
