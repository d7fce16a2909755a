"""The soak's printed report (scripts/soak.py): a few short tables from the result dict."""

from __future__ import annotations

from typing import Any

KINDS = ("unary", "stream", "slow", "large", "control", "invalid", "cancel")
CLASSES = ("ok", "rejected", "cancelled", "raced", "failed")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)]


def _pairs(counts: dict[str, int], most: int = 12) -> str:
    """'a 3, b 2, ...' for the `most` largest counts (in their order), naming how many are left out."""
    keep = set(sorted(counts, key=lambda k: -counts[k])[:most])
    text = ", ".join(f"{k} {v}" for k, v in counts.items() if k in keep) or "none"
    return text + (f" (and {len(counts) - most} more)" if len(counts) > most else "")


def render(result: dict[str, Any]) -> str:
    reload = result["reload"]
    if "error" in reload:
        reload_text = f"{reload['mode']} reload at {reload.get('at_s', '?')} s FAILED: {reload['error']}"
    else:
        reload_text = (f"{reload['mode']} reload at {reload.get('at_s', '?')} s, "
                       f"new versions serving after {reload.get('observed_after_s', '?')} s")
    lines = [
        f"Nereid soak on 127.0.0.1: {result['traffic_s']} s of traffic at ~{result['rate_target']:g} req/s "
        f"(server up in {result['startup_s']} s); {reload_text}",
        "",
    ]
    by_kind = result["by_kind"]
    rows = []
    for kind in [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS)):
        counts = by_kind[kind]
        rows.append([kind, counts.get("sent", 0), *(counts.get(c, 0) for c in CLASSES)])
    rows.append(["total", result["sent"], *(result[c] for c in CLASSES)])
    lines += _table(["requests", "sent", *CLASSES], rows)
    lines += [
        "",
        f"rejected, by status: {_pairs(result['rejected_by_status'])}",
        f"cancelled by the client: {_pairs(result['cancelled_by_how'])}"
        + (f"; answered before the cancel: {_pairs(result['raced_by_how'])}" if result["raced"] else ""),
        f"failed (unexpected): {_pairs(result['failed_by_case']) if result['failed'] else 'none'}",
    ]
    for example in result["failure_examples"][:10]:
        lines.append(f"  {example}")
    lines += ["", *_table(
        ["latency of good requests (ms)", "count", "p50", "p90", "p99", "max"],
        [[label, p["count"], p.get("p50", "-"), p.get("p90", "-"), p.get("p99", "-"), p.get("max", "-")]
         for label, p in result["latency_ms"].items()],
    )]
    versions = "; ".join(f"{model} " + ", ".join(f"v{v} {n}" for v, n in counts.items())
                         for model, counts in result["versions"].items())
    lines += ["", f"answers by version: {versions}"]
    rss = result["rss_mb"]
    server = result["server"]
    lines += [
        f"server RSS (MB): start {rss['start']}, after warm-up {rss['after_warmup']}, end {rss['end']}, "
        f"peak {rss['peak_vmhwm']} (VmHWM); growth after warm-up {rss['growth_after_warmup']} "
        f"(bound {rss['growth_bound']:g}); Python stubs {rss['python_stubs_start']} -> {rss['python_stubs_end']} "
        f"({rss['python_stub_processes_start']} -> {rss['python_stub_processes_end']} processes)",
        f"server: {'alive' if server['alive_at_end'] else 'DIED'} at the end, SIGTERM exit code {server['exit_code']} "
        f"in {server['shutdown_s']} s, {server['tracebacks_in_log']} traceback(s) in {server['log_lines']} log lines",
        "",
    ]
    if result["passed"]:
        lines.append("PASS")
    else:
        lines.append("FAIL")
        lines += [f"  - {p}" for p in result["problems"]]
        if server.get("log_tail"):
            lines += ["server log (last lines):", *(f"  | {line}" for line in server["log_tail"].splitlines())]
    if "workdir" in result:
        lines.append(f"repository and server log kept in {result['workdir']}")
    return "\n".join(lines)
