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


def _replica(name: str, clock: Clock, policy: dict | None = None) -> ModelRollout:
    return ModelRollout("m", parse_policy(policy or {"weights": {1: 90, 2: 10}}), "digest", clock,
                        replica=name, wall=lambda: clock.now)


def test_merge_is_a_union_and_a_stale_file_never_reverts_a_stop(tmp_path) -> None:
    """Replicas share decisions through the file: a stale copy (written before the abort) merged
    later changes nothing; the file keeps every replica's decisions, and both replicas agree."""
    from server.rollout.decisions import decisions_in, read_state, write_state

    clock = Clock()
    a, b = _replica("A", clock), _replica("B", clock)
    write_state(tmp_path, "digest", list(b.log.values()), b.summary)  # B's empty view: the stale file
    stale = read_state(tmp_path)
    clock.now += 1
    assert a.abort() == [2]
    write_state(tmp_path, "digest", list(a.log.values()), a.summary)
    write_state(tmp_path, "digest", list(b.log.values()), b.summary)  # B writes its stale view again
    assert [d.kind for d in decisions_in(read_state(tmp_path), "digest") or []] == ["abort"]  # still there
    assert b.merge(decisions_in(read_state(tmp_path), "digest") or []) and b.weights == {1: 90, 2: 0.0}
    assert "aborted by the operator (decided by replica A)" in b.notes[2]
    assert b.stats[2].replica == {"abort": 1}
    assert a.merge(decisions_in(stale, "digest") or []) == [] and a.weights[2] == 0.0  # stale: no change
    assert read_state(tmp_path)["weights"] == {"1": 90.0, "2": 0.0}  # the summary older servers read


def test_a_promotion_that_missed_a_rollback_is_overruled() -> None:
    clock = Clock()
    policy = {"weights": {1: 90, 2: 10}, "rollback": {"min_requests": 3}}
    a, b = _replica("A", clock, policy), _replica("B", clock, policy)
    for _ in range(3):
        a.observe(2, 0.01, False)  # A sees the canary fail: rolled back
    clock.now += 1
    assert b.promote(2) == 2 and b.stable == 2  # B promotes, not knowing (later in time)
    b.merge(list(a.log.values()))
    a.merge(list(b.log.values()))
    for replica in (a, b):  # the stop wins on both, whatever the order
        assert replica.weights == {1: 90, 2: 0.0} and replica.stable == 1, replica.weights
        assert "overruled by a rollback or abort it had not seen" in replica.notes[2]
    clock.now += 1
    assert b.promote(2) == 2  # promoted again, now knowing of the rollback: it holds
    a.merge(list(b.log.values()))
    assert a.stable == b.stable == 2 and a.weights == b.weights == {1: 0.0, 2: 100.0}


def test_legacy_state_file_becomes_decisions() -> None:
    old = _rollout({"weights": {1: 90, 2: 10}})
    old.weights, old.notes = {1: 90.0, 2: 0.0}, {2: "rolled back: error rate 100.0%"}
    saved = old.decisions()
    again = _rollout({"weights": {1: 90, 2: 10, 3: 5}})
    assert not again.restore(saved)  # other versions: not this policy's state
    again = _rollout({"weights": {1: 90, 2: 10}})
    assert again.restore(saved) and again.weights == {1: 90, 2: 0.0}
    again.abort()  # a later decision replays on top: the rollback is not lost
    assert again.weights == {1: 90, 2: 0.0}
