"""Races between the repository manager's threads (loader threads, drain threads, RPC loads
and unloads), each made to happen deterministically: an in-process RepositoryManager with one
method wrapped so that the other side of the race runs at the exact point where it hurts
(the ensemble races are in test_ensemble.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from util import identity_config, write_model

from server.core.state import ModelState
from server.repository.manager import RepositoryManager
from server.settings import Settings


def _config_json(name: str) -> str:
    return json.dumps({
        "name": name, "backend": "identity", "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
    })


def _explicit(tmp_path: Path, *names: str) -> RepositoryManager:
    repo = tmp_path / "repo"
    for name in names:
        write_model(repo, name, identity_config(name, [("INPUT0", "FP32", [4])]))
    return RepositoryManager(Settings(model_repositories=(repo,), model_control_mode="explicit"))


def test_override_dir_of_a_reload_survives_a_cleanup_during_the_swap(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A load with file overrides replaces a serving copy: the new copy, loaded from the private
    override directory, is not in the registry until the swap. Another thread's override cleanup
    (a drain thread finishing, an unload of another model) landing in the hop to the event loop
    must not delete that directory: the new copy serves from it, and a later reload reads it."""
    manager = _explicit(tmp_path, "m")
    original = manager._on_loop
    armed: list[bool] = []

    def on_loop(fn: Callable[[], None]) -> None:
        if armed and getattr(fn, "__name__", "") == "swap":
            armed.clear()
            manager._cleanup_overrides()  # as a drain thread of another model would, right now
        original(fn)

    monkeypatch.setattr(manager, "_on_loop", on_loop)
    try:
        manager.load_explicit("m", {})
        armed.append(True)
        manager.load_explicit("m", {"config": _config_json("m"), "file:1/weights.bin": b"x"})
        assert not armed, "the swap never ran"
        entry = manager._models["m"]
        serving = entry.versions[1]
        assert serving.state is ModelState.READY and entry.override_dir is not None
        assert serving.spec.model_dir == entry.override_dir
        assert entry.override_dir.is_dir(), "the override directory of the serving copy was deleted"
        private = entry.override_dir
        assert private in manager._override_dirs  # so still deleted once nothing uses it
        manager.unload_explicit("m")
        assert not private.exists()
    finally:
        manager.unload_all(5.0)
        manager.close()


def test_model_health_ends_with_the_models_state_when_notices_cross(tmp_path: Path) -> None:
    """Two threads tell the listeners about one model: the ensemble's own load (READY) and a
    step's removal that blocks it (UNAVAILABLE). Each reads the readiness it passes on before
    calling the listeners, so the READY notice can reach the health service after the blocked
    one; the per-model health service must still end NOT_SERVING, as the model is."""
    import asyncio
    import threading

    from test_ensemble import _chain_manager

    from server.protocol.health import NOT_SERVING, HealthReporter

    manager, apply = _chain_manager(tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    health = HealthReporter(manager.has_ready_version)
    health.bind_loop(loop)
    manager.add_listener(health.model_changed_threadsafe)
    follow = manager._listeners[0]  # _ensembles_follow: runs before the health listener
    crossed: list[bool] = []

    def follow_then_cross(name: str, ready: bool) -> None:
        if name == "chain" and ready and not crossed:
            crossed.append(True)  # chain's READY notice is on its way: now its step goes
            manager.remove("postprocess")
        follow(name, ready)

    manager._listeners[0] = follow_then_cross
    try:
        apply("postprocess")
        apply("chain")
        assert crossed, "chain never became READY"
        assert manager._models["chain"].latest_ready is None  # blocked: its step is gone
        for _ in range(3):  # the scheduled updates, and the tasks they start, have run
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(10)
        assert health.servicer._status.get("chain") == NOT_SERVING
    finally:
        manager.unload_all(5.0)
        manager.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_two_retires_at_once_keep_both_drain_threads(tmp_path: Path) -> None:
    """Two loader threads retire copies at once (two models reloaded together, as poll mode
    does). Both drain threads must stay in the list that unload_all joins at shutdown: one
    lost there is not waited for, and its model (counted as draining) is not unloaded either,
    so the process could exit in the middle of its unload."""
    import threading

    from util import scaled

    manager = _explicit(tmp_path, "a", "b")
    try:
        manager.load_explicit("a", {})
        manager.load_explicit("b", {})
        a, b = manager._models["a"].versions[1], manager._models["b"].versions[1]
        gate = threading.Event()  # the drains last (in-flight requests to wait for) until the check
        for model in (a, b):
            def unload(timeout: float | None = None, release=model.unload) -> None:
                gate.wait(scaled(10))
                release(timeout)
            model.unload = unload  # type: ignore[method-assign]
        other: list[threading.Thread] = []

        class Finished:
            """A finished drain thread whose is_alive() lets the other loader thread retire meanwhile."""

            def is_alive(self) -> bool:
                if not other:
                    other.append(threading.Thread(target=manager._retire, args=([(b, "replaced")],)))
                    other[0].start()
                    other[0].join(scaled(2))  # it has retired b, unless it waits for this one
                return False

        manager._drains = [Finished()]  # type: ignore[list-item]
        manager._retire([(a, "replaced")])
        other[0].join(scaled(10))
        drains = [t for t in manager._drains if isinstance(t, threading.Thread)]
        assert len(drains) == 2, f"a drain thread was lost: {manager._drains}"
        gate.set()
        for thread in drains:
            thread.join(scaled(10))
        assert a.state is b.state is ModelState.UNAVAILABLE
    finally:
        manager.unload_all(5.0)
        manager.close()
