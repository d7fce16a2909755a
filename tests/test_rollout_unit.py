"""The rollout's pure parts with a stepped clock: policy parsing, the window, routing, decisions."""

from __future__ import annotations

import pytest

from server.errors import InvalidInput
from server.rollout.policy import PolicyError, parse_policy
from server.rollout.state import ModelRollout
from server.rollout.window import Window


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rollout(text: dict, clock: Clock | None = None) -> ModelRollout:
    return ModelRollout("m", parse_policy(text), "digest", clock or Clock())


def test_policy_defaults_and_errors() -> None:
    policy = parse_policy({"weights": {1: 95, "2": 5}})
    assert policy.weights == {1: 95.0, 2: 5.0} and policy.stable == 1 and policy.canaries == (2,)
    assert policy.rollback is not None and policy.rollback.max_error_rate == 0.01
    assert parse_policy({"weights": {1: 50, 2: 50}}).stable == 1  # a tie: the older version
    assert parse_policy({"weights": {1: 5, 2: 95}, "stable": 1}).canaries == (2,)
    assert parse_policy({"weights": {1: 1}, "rollback": False}).rollback is None
    for bad, message in [
        ({"weights": {}}, "at least one version"),
        ({"weights": {1: 0}}, "share above 0"),
        ({"weights": {0: 1}}, "version number > 0"),
        ({"weights": {1: -1}}, "expected a number >= 0"),
        ({"weights": {1: 1}, "stable": 2}, "no entry in 'weights'"),
        ({"weights": {1: 1}, "shadow": {"versions": [1]}}, "both take a share and be a shadow"),
        ({"weights": {1: 1}, "canary": 2}, "unknown key(s) canary"),
        ([1, 2], "must be a mapping"),
    ]:
        with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_policy(bad)


def test_window_forgets_what_is_older_than_its_span() -> None:
    window = Window(10.0)
    window.add(0.0, 0.1, False)
    window.add(5.0, 0.2, True)
    assert (window.count, window.errors) == (2, 1)
    window.add(10.5, 0.3, True)  # the first outcome is now older than 10 s
    assert (window.count, window.errors, window.error_rate) == (2, 0, 0.0)


def test_sticky_choice_is_deterministic_and_follows_weights() -> None:
    rollout = _rollout({"weights": {1: 80, 2: 20}})
    every = lambda v: True  # noqa: E731
    first = {f"k{i}": rollout.choose(every, f"k{i}") for i in range(1000)}
    assert all(rollout.choose(every, k) == v for k, v in first.items())
    assert 150 <= sum(1 for v in first.values() if v == 2) <= 250
    assert {rollout.choose(lambda v: v == 1, f"k{i}") for i in range(100)} == {1}  # only READY versions
    assert rollout.choose(lambda v: False, "k") is None


def test_rollback_waits_for_min_requests_then_trips_on_error_rate() -> None:
    clock = Clock()
    rollout = _rollout({"weights": {1: 90, 2: 10}, "rollback": {"min_requests": 10, "max_error_rate": 0.2}}, clock)
    for _ in range(9):
        rollout.observe(2, 0.01, False)
    assert rollout.weights[2] == 10  # 9 < min_requests: no decision yet
    rollout.observe(2, 0.01, False)
    assert rollout.weights[2] == 0 and rollout.notes[2].startswith("rolled back: error rate 100.0% (10 of 10)")
    for _ in range(50):
        rollout.observe(1, 0.01, False)  # the stable version is never rolled back
    assert rollout.weights[1] == 90


def test_rollback_on_p99_and_automatic_promotion() -> None:
    clock = Clock()
    slow = _rollout({"weights": {1: 90, 2: 10}, "rollback": {"min_requests": 5, "max_p99_ms": 50}}, clock)
    for _ in range(5):
        slow.observe(2, 0.2, True)
    assert slow.weights[2] == 0 and "p99 latency 200.0 ms" in slow.notes[2]
    good = _rollout({"weights": {1: 90, 2: 10}, "rollback": {"min_requests": 5}, "promote": {"after_clean_s": 60}},
                    clock)
    for _ in range(10):
        good.observe(2, 0.01, True)
    assert good.stable == 1  # clean, but not for 60 s yet
    clock.now += 61
    for _ in range(5):
        good.observe(2, 0.01, True)
    assert good.stable == 2 and good.weights == {1: 0.0, 2: 100.0} and "automatically" in good.notes[2]


def test_promote_and_abort() -> None:
    rollout = _rollout({"weights": {1: 80, 2: 10, 3: 10}})
    with pytest.raises(InvalidInput, match="2 canaries"):
        rollout.promote()
    assert rollout.abort() == [2, 3] and rollout.weights == {1: 80, 2: 0.0, 3: 0.0}
    assert rollout.promote(3) == 3 and rollout.weights == {1: 0.0, 2: 0.0, 3: 100.0} and rollout.stable == 3
    saved = rollout.decisions()
    again = _rollout({"weights": {1: 80, 2: 10, 3: 10}})
    assert again.restore(saved) and again.weights == rollout.weights and again.stable == 3
    other = ModelRollout("m", parse_policy({"weights": {1: 80, 2: 10, 3: 10}}), "another digest")
    assert not other.restore(saved) and other.stable == 1
