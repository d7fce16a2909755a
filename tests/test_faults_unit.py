"""Unit tests (no server) for server/core/faults.py: parameters, the failure counter, the watchdog."""

from __future__ import annotations

import threading
import time

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from server.core.faults import FailureCounter, Watchdog, Watched, execution_timeout_s, failure_threshold


def _config(parameters: dict[str, str]) -> mc.ModelConfig:
    config = mc.ModelConfig()
    for key, value in parameters.items():
        text_format.Parse(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}', config)
    return config


def test_model_parameters_override_the_server_defaults() -> None:
    assert execution_timeout_s(_config({}), 2.5) == 2.5
    assert execution_timeout_s(_config({"execution_timeout_ms": "300"}), 2.5) == 0.3
    assert failure_threshold(_config({}), 0) == 0
    assert failure_threshold(_config({"failure_threshold": "4"}), 0) == 4
    for bad in ("soon", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="execution_timeout_ms"):
            execution_timeout_s(_config({"execution_timeout_ms": bad}), 0)
        with pytest.raises(ValueError, match="failure_threshold"):
            failure_threshold(_config({"failure_threshold": bad}), 0)


def test_failure_counter_counts_only_failures_in_a_row() -> None:
    counter = FailureCounter(3)
    assert counter.failed(RuntimeError("a")) is None
    assert counter.failed(RuntimeError("b")) is None
    counter.succeeded()
    assert counter.failed(RuntimeError("c")) is None and counter.failed(RuntimeError("d")) is None
    reason = counter.failed(RuntimeError("e"))
    assert reason is not None and "3 times in a row" in reason and "e" in reason
    assert FailureCounter(0).failed(RuntimeError("x")) is None  # 0: never


def test_watchdog_reports_each_overdue_execution_once() -> None:
    dog = Watchdog()
    expired: list[object] = []
    done = threading.Event()

    def on_expired(payload: object) -> None:
        expired.append(payload)
        done.set()

    watched = Watched()
    dog.watch(watched, 0.05, on_expired)
    watched.begin("quick")
    assert watched.end() is False  # finished in time: never reported
    watched.begin("slow")
    assert done.wait(2.0)
    time.sleep(0.2)
    assert expired == ["slow"]  # once, however long it overruns
    assert watched.end() is True
