"""The Python half of scripts/compose_e2e: traffic through the stack's load balancer, then
the dashboard's queries read back from Prometheus.

    compose_e2e.py traffic --target 127.0.0.1:8001 --seconds 60
    compose_e2e.py queries --prometheus http://127.0.0.1:9090 --dashboard deploy/grafana/dashboards/nereid.json
    compose_e2e.py spread --target 127.0.0.1:8001 --metrics http://127.0.0.1:8002 --connections 16

`traffic` drives five example models from several threads, plus a backlog that queues (and
sends a few requests that must fail, so that the error panels have something to show), counts answers by status
code and fails if a valid request failed. `queries` evaluates each panel's expressions as
an instant query and over the last minutes (Grafana's variables replaced: every model and
version, a 1 m rate window) and prints what Prometheus returned, now and at its largest;
it fails when a panel that must have data has none.
`spread` (scripts/compose_e2e balance) opens connections one after another to one
`nereid serve --workers N` container, a few calls on each, and prints how many calls each
frontend forwarded (`nereid_worker_calls_total`): in turn gives equal counts, the kernel's
hash a random split.
All talk to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

# Grafana's variables, as the dashboard is first shown: all models, all versions.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$version": ".*"}
# Panels that show nothing on a healthy idle stack (no failures, nothing waiting, every model ready).
MAY_BE_EMPTY = {"Failures by reason", "Models not ready"}


def grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def _inputs(model: str) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, array: np.ndarray, datatype: str) -> Any:
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    rng = np.random.default_rng(0)
    if model == "simple":
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        return [tensor("INPUT0", a, "INT32"), tensor("INPUT1", a, "INT32")]
    if model == "mlp":
        return [tensor("INPUT0", rng.random((4, 64), dtype=np.float32), "FP32")]
    if model == "mlp_compute":
        return [tensor("INPUT0", rng.random((1, 256), dtype=np.float32), "FP32")]
    if model == "string_lower":
        return [tensor("INPUT0", np.array([b"Hello", b"WORLD"], dtype=object), "BYTES")]
    if model == "text_features":
        return [tensor("TEXT", np.array([[b"a model server"]], dtype=object), "BYTES")]
    raise ValueError(model)


def traffic(target: str, seconds: float, threads: int) -> int:
    """Valid requests on several models from `threads` clients, plus two bad requests in 50."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    models = ["simple", "mlp", "mlp_compute", "string_lower", "text_features"]
    counts: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(worker: int) -> None:
        client = grpcclient.InferenceServerClient(target)
        # Two kinds of bad request: refused before the model (simple wants [.., 16]), and
        # failed inside it (text_features wants UTF-8: Triton's reason BACKEND).
        bad_shape = [grpcclient.InferInput("INPUT0", [1, 15], "INT32"),
                     grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        bad_shape[0].set_data_from_numpy(np.zeros((1, 15), dtype=np.int32))
        bad_shape[1].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
        bad_text = [grpcclient.InferInput("TEXT", [1, 1], "BYTES")]
        bad_text[0].set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
        bad = {0: ("simple", bad_shape, "simple (bad shape)"),
               25: ("text_features", bad_text, "text_features (bad UTF-8)")}
        prepared = {m: _inputs(m) for m in models}
        n = 0
        while time.monotonic() < deadline:
            n += 1
            model = models[(n + worker) % len(models)]
            model, inputs, label = bad.get(n % 50, (model, prepared[model], model))
            try:
                client.infer(model, inputs, client_timeout=10)
                key = f"{label} OK"
            except InferenceServerException as exc:
                key = f"{label} {exc.status()}"
                if label == model:  # a valid request failed
                    with lock:
                        unexpected.append(f"{model}: {exc.status()} {exc.message()}")
            with lock:
                counts[key] += 1
        client.close()

    def backlog(depth: int = 16) -> None:
        """Keeps `depth` requests in flight on mlp_compute (no dynamic batcher): most of them wait
        in its queues, which is what the queue-depth panel and the autoscaler watch."""
        client = grpcclient.InferenceServerClient(target)
        inputs = _inputs("mlp_compute")
        slots = threading.Semaphore(depth)

        def answered(result: Any, error: Any) -> None:
            key = f"mlp_compute ({depth} in flight) " + ("OK" if error is None else str(error.status()))
            with lock:
                counts[key] += 1
                if error is not None:
                    unexpected.append(f"mlp_compute backlog: {error}")
            slots.release()

        while time.monotonic() < deadline:
            slots.acquire()
            client.async_infer("mlp_compute", inputs, answered, client_timeout=30)
        for _ in range(depth):
            slots.acquire()
        client.close()

    started = time.monotonic()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    workers.append(threading.Thread(target=backlog))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(f"traffic: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s) through {target}, "
          f"{threads} client threads and a backlog of 16")
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}")
    for line in unexpected[:10]:
        print(f"  UNEXPECTED {line}")
    return 1 if unexpected else 0


def prometheus_get(base: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as reply:
        body = json.load(reply)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, legend format, expression) for every target of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target.get("legendFormat", ""), target["expr"]))
    return out


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = fmt
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or json.dumps(labels)


def queries(prometheus: str, dashboard_path: str, minutes: float) -> int:
    """Each query now, and its largest value over the last `minutes` (a 5 s step)."""
    dashboard = json.load(open(dashboard_path))
    empty = []
    end = time.time()
    for title, fmt, expr in panel_targets(dashboard):
        promql = grafana_to_promql(expr)
        result = prometheus_get(prometheus, "/api/v1/query", {"query": promql, "time": f"{end:.3f}"})["result"]
        window = prometheus_get(prometheus, "/api/v1/query_range", {
            "query": promql, "start": f"{end - minutes * 60:.0f}", "end": f"{end:.0f}", "step": "5"})["result"]
        peaks = {legend(fmt, s["metric"]): max((float(v) for _, v in s["values"] if v not in ("NaN", "+Inf")),
                                               default=float("nan")) for s in window}
        print(f"[{title}] {promql}")
        if not result:
            print("    (no data)")
            if title not in MAY_BE_EMPTY:
                empty.append(title)
        for series in sorted(result, key=lambda s: legend(fmt, s["metric"])):
            name = legend(fmt, series["metric"])
            print(f"    {name}: {float(series['value'][1]):.6g} (max over {minutes:g} min: "
                  f"{peaks.get(name, float('nan')):.6g})")
    if empty:
        print(f"panels without data: {sorted(set(empty))}")
        return 1
    return 0


def worker_calls(metrics: str) -> dict[int, int]:
    """`nereid_worker_calls_total` per frontend, from the server's metrics endpoint."""
    with urllib.request.urlopen(f"{metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.findall(r'^nereid_worker_calls_total{worker="(\d+)"} ([0-9.e+]+)$', text, re.M)
    return {int(w): int(float(v)) for w, v in found}


def spread(target: str, metrics: str, connections: int, calls: int) -> int:
    """`connections` clients opened one after another (each its own channel and so its own
    TCP connection), `calls` infers of `simple` on each; the calls each frontend forwarded.
    Exits 0 when the connections are spread evenly (in turn: the frontends' counts differ by
    at most one connection), 3 when they are not (the hash, most of the time)."""
    import tritonclient.grpc as grpcclient

    before = worker_calls(metrics)
    for _ in range(connections):
        client = grpcclient.InferenceServerClient(target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(calls):
            client.infer("simple", _inputs("simple"))
        client.close()
    after = worker_calls(metrics)
    moved = {w: after[w] - before.get(w, 0) for w in sorted(after)}
    per_connection = {w: n / calls for w, n in moved.items()}
    print(f"calls per frontend ({connections} connections x {calls} calls): {moved}; "
          f"connections per frontend: {per_connection}")
    if sum(moved.values()) != connections * calls:
        print(f"expected {connections * calls} calls in all")
        return 1
    connected = [n // calls for n in moved.values()]
    return 0 if len(moved) > 1 and max(connected) - min(connected) <= 1 else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("traffic")
    t.add_argument("--target", default="127.0.0.1:8001")
    t.add_argument("--seconds", type=float, default=60.0)
    t.add_argument("--threads", type=int, default=8)
    q = sub.add_parser("queries")
    q.add_argument("--prometheus", default="http://127.0.0.1:9090")
    q.add_argument("--dashboard", default="deploy/grafana/dashboards/nereid.json")
    q.add_argument("--minutes", type=float, default=3.0, help="window for each series' maximum")
    s = sub.add_parser("spread")
    s.add_argument("--target", default="127.0.0.1:8001")
    s.add_argument("--metrics", default="http://127.0.0.1:8002")
    s.add_argument("--connections", type=int, default=16)
    s.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    for url in (getattr(args, "target", ""), getattr(args, "prometheus", ""), getattr(args, "metrics", "")):
        host = urllib.parse.urlsplit(url if "//" in url else f"//{url}").hostname
        if url and host not in ("127.0.0.1", "localhost"):
            parser.error(f"{url}: only 127.0.0.1 is allowed")
    if args.command == "traffic":
        return traffic(args.target, args.seconds, args.threads)
    if args.command == "spread":
        return spread(args.target, args.metrics, args.connections, args.calls)
    return queries(args.prometheus, args.dashboard, args.minutes)


if __name__ == "__main__":
    sys.exit(main())
