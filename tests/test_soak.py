"""scripts/soak: a short soak against a real server passes, and what it counts is what happened.

The soak (docs/DEVELOPING.md, "Soak") starts its own server on 127.0.0.1, mixes valid, invalid
and cancelled traffic with a model reload halfway, and exits 1 on any unexpected status, a
reload that was not seen, a dead server or RSS growth. Here it runs for a few seconds in each
reload mode; the Tally tests check the classification the verdict rests on.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from util import PYTHON, ROOT, scaled

sys.path.insert(0, str(ROOT / "scripts"))

from soak_tally import Tally  # noqa: E402

RELOADED = ("id_batched", "mlp", "py_echo")


def run_soak(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "soak.json"
    proc = subprocess.run([PYTHON, str(ROOT / "scripts" / "soak.py"), "--json", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("control", "duration"), [("poll", "8"), ("explicit", "4")])
def test_short_soak_passes(tmp_path, control, duration):
    # The RSS bound is tighter than the default (64 MB, sized for 60 s runs): a server that kept
    # every rejected request grew ~45 MB in 8 s here, a healthy one 4-8 MB.
    proc, result = run_soak(tmp_path, "--duration", duration, "--control", control, "--max-rss-growth-mb", "24")
    assert proc.returncode == 0 and result["passed"], proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    # Every kind of traffic really ran, and every class of outcome occurred.
    for kind in ("unary", "stream", "invalid", "cancel", "control", "large"):
        assert result["by_kind"][kind]["sent"] > 0, kind
    assert result["ok"] > 100 and result["rejected"] > 20 and result["cancelled"] > 5
    assert result["failed"] == 0 and not result["failure_examples"]
    assert result["sent"] == result["ok"] + result["rejected"] + result["cancelled"] + result["raced"]
    # The reload happened in the middle of the traffic: both versions answered.
    assert "error" not in result["reload"], result["reload"]
    for model in RELOADED:
        assert set(result["versions"][model]) == {"1", "2"}, (model, result["versions"][model])
    assert result["server"]["alive_at_end"] and result["server"]["exit_code"] == 0
    rss = result["rss_mb"]
    assert rss["start"] > 0 and rss["end"] > 0 and rss["peak_vmhwm"] >= rss["end"]
    assert rss["python_stubs_end"] > 0  # the Python model's stub is a child of the server


def test_tally_classifies_outcomes():
    tally = Tally()
    tally.good("unary", "unary m", "m", "1", 0.001)
    tally.refused("invalid", "wrong-shape", "INVALID_ARGUMENT", frozenset({"INVALID_ARGUMENT"}))
    tally.refused("invalid", "wrong-shape", "INTERNAL", frozenset({"INVALID_ARGUMENT"}))
    tally.refused("invalid", "garbage", "OK", frozenset({"INVALID_ARGUMENT"}))
    tally.gave_up("cancel", "future-cancel", "CANCELLED", "CANCELLED")
    tally.gave_up("cancel", "client-deadline", "OK", "DEADLINE_EXCEEDED")
    # A CANCELLED where the client set a deadline is the server's doing, not the client's.
    tally.gave_up("cancel", "client-deadline", "CANCELLED", "DEADLINE_EXCEEDED")
    tally.bad("unary", "m", "UNKNOWN", "boom")
    result = tally.snapshot()
    assert (result["sent"], result["ok"], result["rejected"], result["cancelled"], result["raced"],
            result["failed"]) == (8, 1, 1, 1, 1, 4)
    assert result["failed_by_status"] == {"CANCELLED": 1, "INTERNAL": 1, "OK": 1, "UNKNOWN": 1}
    assert result["by_kind"]["invalid"] == {"sent": 3, "rejected": 1, "failed": 2}
    assert len(result["failure_examples"]) == 4
