"""Triton's response cache: finished results kept by a hash of the request, so a repeated
request is answered without running the model.

The server holds one `ResponseCache` (`--cache-config local,size=N`, or the deprecated
`--response-cache-byte-size N`), shared by every model whose config says
`response_cache { enable: true }`, exactly as Triton's `local` cache is. Each such model
version gets a `ModelCache` view (its name and version go into every key).

What is kept, and why this way:
- The key is a 128-bit BLAKE2b digest of the model name and version, every input's name,
  datatype, shape and bytes (sorted by name), the outputs the client asked for, and the
  request parameters a model can read (not `priority`, `timeout`, sequence controls or
  `binary_data_output`, which change how a request is served, not what it computes).
  Triton hashes name, version, input names and bytes into 64 bits; the datatype, shape and
  requested outputs are added here because two requests with the same bytes but another
  shape or other requested outputs can have other answers.
- Values are copies of the outputs, owned by the entry: a model may return views into the
  request's own buffers (identity returns its inputs), and a cache entry must not keep a
  finished request's received message alive. A hit returns fresh copies, so nothing the
  caller does to its outputs reaches the entry.
- Entries are bounded by the byte budget (output bytes plus a small fixed overhead per
  entry); the least recently used go first. A result larger than the whole budget is not
  kept.
- Identical requests that arrive while the first is still computing wait for it (one
  computation, many answers: "single flight"); they count as hits. Only a successful result
  is stored: when the computation fails or is cancelled, the waiters run again themselves
  (one of them leads the next try), so a transient failure never answers the others.

Everything here runs on the event loop (Model.infer is awaited there), so the store needs no
lock beyond the one that keeps a metrics scrape from reading it mid-change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from server.types import InferenceRequest

if TYPE_CHECKING:
    from server.core.stats import ModelStats

log = logging.getLogger("nereid.cache")

# Request parameters that change how a request is served, not what the model computes.
SERVING_PARAMETERS = frozenset({
    "priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output",
    "triton_enable_empty_final_response",
})
ENTRY_OVERHEAD = 128  # bytes charged per entry beyond its outputs (key, bookkeeping)

Outputs = dict[str, np.ndarray]


def parse_cache_config(values: list[str], byte_size: int | None) -> int | None:
    """The local cache's size in bytes from Triton's flags, or None when no cache is configured.

    `--cache-config <cache>,<key>=<value>` may repeat (one key each); only the `local` cache
    exists here. `--response-cache-byte-size N` is Triton's deprecated spelling of
    `--cache-config local,size=N`; giving both is refused, as Triton does."""
    if byte_size is not None and values:
        raise ValueError("Incompatible flags --response-cache-byte-size and --cache-config both provided. "
                         "Please provide one or the other.")
    if byte_size is not None:
        if byte_size < 0:
            raise ValueError("--response-cache-byte-size must be >= 0")
        return byte_size or None  # Triton: 0 means no cache
    names: set[str] = set()
    settings: dict[str, str] = {}
    for raw in values:
        name, comma, setting = raw.partition(",")
        key, eq, value = setting.partition("=")
        if not (comma and eq and name and key):
            raise ValueError(f"--cache-config option format is '<cache name>,<setting>=<value>'. Got {raw}")
        names.add(name)
        settings[key] = value
    if not names:
        return None
    if len(names) > 1:
        raise ValueError("found multiple cache configurations (" + ", ".join(sorted(names)) +
                         "); only one cache implementation may be specified")
    (name,) = names
    if name != "local":
        raise ValueError(f"--cache-config: unknown cache '{name}'; nereid has the 'local' cache only")
    unknown = set(settings) - {"size"}
    if unknown:
        raise ValueError(f"--cache-config local: unknown setting(s) {', '.join(sorted(unknown))}; expected size")
    if "size" not in settings:
        raise ValueError("--cache-config local: 'size' (bytes) is required, e.g. local,size=1048576")
    try:
        size = int(settings["size"])
    except ValueError:
        raise ValueError(f"--cache-config local,size expects a number of bytes, got '{settings['size']}'") from None
    if size < 0:
        raise ValueError(f"--cache-config local,size must be >= 0, got {size}")
    return size or None


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return sum(len(item) if isinstance(item, bytes | str) else 8 for item in array.flat) + 8 * array.size
    return int(array.nbytes)


def _own_copy(array: np.ndarray) -> np.ndarray:
    """A copy that owns its memory (never a view into the request or another buffer)."""
    return np.array(array, copy=True, order="C")


@dataclass(slots=True)
class _Entry:
    outputs: Outputs
    nbytes: int


class ResponseCache:
    """The server's one response cache: LRU entries bounded by `capacity` bytes, shared by every
    model that enables it, plus the computations in flight (single flight)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Outputs | None]] = {}
        self._lock = threading.Lock()
        self.used = 0
        self.lookups = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes) -> Outputs | None:
        """The entry's outputs as fresh copies (and mark it most recently used), or None."""
        with self._lock:
            self.lookups += 1
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return {name: _own_copy(array) for name, array in entry.outputs.items()}

    def insert(self, key: bytes, outputs: Outputs) -> bool:
        """Keep copies of `outputs` under `key`, evicting least recently used entries to make
        room. False when the result alone exceeds the budget (it is not kept)."""
        copies = {name: _own_copy(array) for name, array in outputs.items()}
        size = ENTRY_OVERHEAD + sum(_nbytes(array) for array in copies.values())
        if size > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old.nbytes
            while self._entries and self.used + size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self.used -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = _Entry(copies, size)
            self.used += size
        return True

    def utilization(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0


def _hash_array(digest: hashlib.blake2b, array: np.ndarray) -> None:
    if array.dtype == object:  # BYTES: each element length-prefixed, so ["ab","c"] != ["a","bc"]
        for item in array.flat:
            data = item if isinstance(item, bytes) else str(item).encode()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    else:
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)


class ModelCache:
    """One model version's use of the server's cache: its key prefix and its statistics."""

    def __init__(self, cache: ResponseCache, name: str, version: int, stats: ModelStats) -> None:
        self.cache = cache
        self._prefix = f"{len(name)}:{name}:{version}".encode()
        self._stats = stats

    def key(self, request: InferenceRequest) -> bytes:
        digest = hashlib.blake2b(self._prefix, digest_size=16)
        inputs = request.inputs
        for name in sorted(inputs):
            array = inputs[name]
            digest.update(f"\0{len(name)}:{name}:{array.dtype.str}:{array.shape}".encode())
            _hash_array(digest, array)
        digest.update(repr(request.requested_outputs).encode())
        params = [(k, v) for k, v in sorted(request.parameters.items()) if k not in SERVING_PARAMETERS]
        if params:
            digest.update(repr(params).encode())
        return digest.digest()

    async def infer(self, request: InferenceRequest,
                    run: Callable[[InferenceRequest], Awaitable[Outputs]]) -> Outputs:
        """Answer from the cache, from an identical request already computing, or by running
        the request (`run`) and keeping its result."""
        started = perf_counter_ns()
        key = self.key(request)
        cache = self.cache
        while True:
            lookup_start = perf_counter_ns()
            outputs = cache.lookup(key)
            if outputs is not None:
                done = perf_counter_ns()
                self._stats.record_cache_hit(done - started, lookup_start - started, done - lookup_start)
                return outputs
            pending = cache._inflight.get(key)
            if pending is None:
                break
            # Wait without cancelling the leader's future if this client goes away.
            shared = await asyncio.shield(pending)
            if shared is not None:
                with cache._lock:
                    cache.hits += 1
                done = perf_counter_ns()
                self._stats.record_cache_hit(done - started, lookup_start - started, done - lookup_start)
                return {name: _own_copy(array) for name, array in shared.items()}
            # The leader failed or was cancelled: try again (one waiter leads the next run).
        lookup_ns = perf_counter_ns() - lookup_start
        with cache._lock:
            cache.misses += 1
        future: asyncio.Future[Outputs | None] = asyncio.get_running_loop().create_future()
        cache._inflight[key] = future
        result: Outputs | None = None
        try:
            result = await run(request)
            insert_start = perf_counter_ns()
            if not cache.insert(key, result):
                log.warning("response of %d bytes for model key %s exceeds the cache size (%d bytes): not cached",
                            sum(_nbytes(a) for a in result.values()), self._prefix.decode(), cache.capacity)
            self._stats.record_cache_miss(lookup_ns + perf_counter_ns() - insert_start)
            return result
        finally:
            del cache._inflight[key]
            if not future.done():
                future.set_result(result)


def model_cache(config: mc.ModelConfig, cache: ResponseCache | None, version: int,
                stats: ModelStats) -> tuple[ModelCache | None, str]:
    """The version's cache view when both the server and its config enable the cache, and the
    reason it cannot load ('' when it can). As Triton: a decoupled model with the cache enabled
    is refused at load; a model enabling it on a server without a cache just runs uncached;
    sequence models and top-level ensemble requests are not cached (a warning says so)."""
    if not config.response_cache.enable:
        return None, ""
    label = f"'{config.name}' version {version}"
    if config.model_transaction_policy.decoupled:
        return None, (f"Response Cache does not currently support model {config.name} with 'decoupled' "
                      "transaction policy. Please disable the response cache.")
    if cache is None:
        log.warning("model %s enables response_cache but the server has no cache (--cache-config "
                    "local,size=N): its responses are not cached", label)
        return None, ""
    if config.WhichOneof("scheduling_choice") == "sequence_batching":
        log.warning("model %s enables response_cache, but sequence models are not cached (as Triton)", label)
        return None, ""
    if config.platform == "ensemble" or config.HasField("ensemble_scheduling"):
        log.warning("model %s enables response_cache, but top-level ensemble requests are not cached (as "
                    "Triton); enable it on the composing models", label)
        return None, ""
    return ModelCache(cache, config.name, version, stats), ""
