"""Per-client rate limits: a token bucket per (client, model), enforced at the edge.

A client is named by a request header (`--rate-limit-client-header`, e.g. set by a trusted
proxy or API gateway), else by its TLS client certificate (mutual TLS), else by its IP
address. Each model may set its own limit with the config parameter
`rate_limit_per_client` ("RATE" or "RATE:BURST", requests per second); the server default
is `--rate-limit-per-client`. A request over the limit is answered RESOURCE_EXHAUSTED at
once, before it is decoded or queued, so a flooding client costs almost nothing and
others keep their share; tokens refill continuously, so it is back at full speed as soon
as it slows down.

A header is only as trustworthy as whoever sets it: a client that may choose its own
header value can spread over many names. The table of buckets is bounded (least recently
used names are forgotten), so that costs memory only up to the bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import Overloaded

PARAMETER = "rate_limit_per_client"
MAX_CLIENTS = 10_000


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float

    def __str__(self) -> str:
        return f"{self.per_second:g} requests/s (burst {self.burst:g})"


def parse_rate(text: str) -> Rate:
    """'RATE' or 'RATE:BURST' (requests per second; the burst defaults to one second's worth)."""
    rate_text, _, burst_text = text.strip().partition(":")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if burst_text else max(rate, 1.0)
    except ValueError:
        raise ValueError(f"expected RATE or RATE:BURST in requests per second, got '{text}'") from None
    if not (rate > 0 and burst >= 1) or rate == float("inf"):
        raise ValueError(f"the rate must be > 0 and the burst >= 1, got '{text}'")
    return Rate(rate, burst)


class RateLimiter:
    def __init__(self, default: Rate | None, header: str = "", clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.default = default
        self.header = header.lower()
        self._clock = clock
        self._max = max_clients
        # (client, model) -> [tokens, last refill time]
        self._buckets: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def rate_for(self, model: Any) -> Rate | None:
        """The model's own limit (config parameter, parsed once per loaded version), else the default."""
        cache = model.wire_cache
        if "rate_limit" not in cache:
            param = model.config.parameters.get(PARAMETER)
            try:
                cache["rate_limit"] = parse_rate(param.string_value) if param is not None else self.default
            except ValueError:
                cache["rate_limit"] = self.default  # nereid validate reports it; serving keeps the default
        rate: Rate | None = cache["rate_limit"]
        return rate

    def client_of(self, context: Any) -> str:
        if self.header:
            for key, value in context.invocation_metadata() or ():
                if key == self.header:
                    return f"{self.header}={value if isinstance(value, str) else value.decode(errors='replace')}"
        auth = context.auth_context() or {}
        for key in ("x509_common_name", "x509_subject_alternative_name"):
            names = auth.get(key)
            if names:
                return f"certificate {names[0].decode(errors='replace')}"
        peer = context.peer() or ""
        return peer.rsplit(":", 1)[0] if peer.count(":") > 1 or peer.startswith("ip") else peer

    def check(self, context: Any, model: Any) -> None:
        """Take one token for this client and model, or raise Overloaded (RESOURCE_EXHAUSTED)."""
        rate = self.rate_for(model)
        if rate is None:
            return
        client = self.client_of(context)
        key = (client, model.name)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [rate.burst, now]
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(rate.burst, bucket[0] + (now - bucket[1]) * rate.per_second)
            bucket[1] = now
        if bucket[0] < 1.0:
            raise Overloaded(
                f"rate limit exceeded: client '{client[:80]}' may send model '{model.name}' at most {rate}; "
                "retry later")
        bucket[0] -= 1.0
