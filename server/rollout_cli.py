"""`nereid rollout status|promote|abort MODEL --url HOST:PORT`: the rollout control service's client.

Calls /nereid.Rollout/<Verb> on a running server's gRPC port (server/protocol/rollout_rpc.py)
and prints the rollout's state as a table (or JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

VERBS = {"status": "Status", "promote": "Promote", "abort": "Abort"}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rollout = sub.add_parser("rollout", help="show, promote or abort a model's rollout on a running server")
    rollout.add_argument("action", choices=sorted(VERBS), help="status, promote (canary to 100%%) or abort "
                         "(canaries to 0)")
    rollout.add_argument("model", help="model name")
    rollout.add_argument("--url", default="localhost:8001", help="the server's gRPC address (default localhost:8001)")
    rollout.add_argument("--version", type=int, default=None,
                         help="promote: the version to promote (needed when there are several canaries)")
    rollout.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                         help="gRPC metadata to send, e.g. a restricted protocol's header (repeatable)")
    rollout.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    rollout.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")


def call(url: str, action: str, model: str, version: int | None = None, timeout: float = 10.0,
         headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if version is not None:
        body["version"] = version
    with grpc.insecure_channel(url) as channel:
        method = channel.unary_unary(f"/nereid.Rollout/{VERBS[action]}")
        answer = method(json.dumps(body).encode(), timeout=timeout, metadata=headers or None)
    result: dict[str, Any] = json.loads(answer)
    return result


def render(status: dict[str, Any]) -> str:
    lines = [f"model '{status['model']}': stable version {status['stable']}"]
    if status.get("promoted") is not None:
        lines.append(f"promoted version {status['promoted']} to 100%")
    if status.get("aborted") is not None:
        lines.append(f"aborted: version(s) {', '.join(map(str, status['aborted'])) or 'none'} to weight 0")
    lines.append(f"{'VERSION':>7}  {'ROLE':<7} {'READY':<5} {'SHARE':>7} {'REQUESTS':>9} {'ERRORS':>7} "
                 f"{'WIN ERR%':>8} {'WIN P99ms':>9}  NOTE")
    for row in status["versions"]:
        window = row["window"]
        note = row["note"]
        if "shadow" in row:
            shadow = row["shadow"]
            rate = "-" if shadow["agreement"] is None else f"{shadow['agreement']:.1%}"
            note = f"agreement {rate} of {shadow['compared']} compared, {shadow['errors']} errors; {note}".rstrip("; ")
        lines.append(f"{row['version']:>7}  {row['role']:<7} {str(row['ready']).lower():<5} {row['share']:>7.1%} "
                     f"{row['requests']:>9} {row['errors']:>7} {window['error_rate']:>8.1%} "
                     f"{window['p99_ms']:>9.1f}  {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    headers = []
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"nereid rollout: --header expects KEY=VALUE, got '{item}'", file=sys.stderr)
            return 2
        headers.append((key.strip().lower(), value))
    try:
        status = call(args.url, args.action, args.model, args.version, args.timeout, headers)
    except grpc.RpcError as exc:
        print(f"nereid rollout {args.action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=1) if args.json else render(status))
    return 0
