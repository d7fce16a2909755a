"""Rollout decisions as a grow-only log that replicas share through `<model>/.rollout-state.json`.

Several servers may serve one repository (a shared volume). Each decides from its own traffic,
so the decisions (rollback, abort, promote) must reach the others, and a stale or racing copy
of the file must never undo one. Hence the shape (docs/ROLLOUTS.md, "Replicas"):

- The file keeps, per rollout.yaml digest, the *set* of decisions ever taken under that
  policy, each with a unique id (`<replica>/<seq>`), its wall-clock time and its replica.
  Merging is set union: a replica never drops a decision it knows, so reading an old file
  can only add nothing, never take something away.
- The state (weights, stable version, notes) is a pure function of the policy and that set
  (`replay`): decisions in (time, replica, seq) order from the policy's weights. Replicas
  holding the same set hold the same state.
- Safety wins on conflict: a promotion of version V is skipped when a rollback or abort of V
  exists that the promoting replica had not seen (`seen` lists the stop decisions it knew).
  Rollbacks and aborts commute (both only set weights to 0); a rollback of the version that
  is stable at that point of the replay is ignored.
- Writes hold an flock on `.rollout-state.lock`, read the file, write the union to a temporary
  file and rename it over the old one (readers see the old or the new file, never half).
  Where flock does not hold (some network file systems), a write may still drop another's
  decision from the *file*; the replica that took it sees its decision missing at its next
  look and writes the union again, so the file converges.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILENAME = ".rollout-state.json"
LOCK_FILENAME = ".rollout-state.lock"
FORMAT = 2
KEEP_POLICIES = 4  # digests kept in the file (the most recently decided); a replica on an older policy keeps its own

STOPS = ("rollback", "abort")


def new_replica_id() -> str:
    """This server's name in decisions: host, pid and a random tag (pids repeat across hosts and restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Decision:
    id: str  # "<replica>/<seq>": unique across replicas and restarts
    replica: str
    seq: int
    at: float  # wall clock (time.time()) when decided; the replay order
    kind: str  # "rollback" | "abort" | "promote"
    versions: tuple[int, ...]  # rollback/promote: the version; abort: the versions it stopped
    why: str  # rollback: the thresholds crossed; promote: how ("by the operator", "automatically, ...")
    seen: tuple[str, ...] = ()  # promote: ids of the stop decisions the replica knew when it decided

    @property
    def order(self) -> tuple[float, str, int]:
        return (self.at, self.replica, self.seq)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replica": self.replica, "seq": self.seq, "at": self.at, "kind": self.kind,
                "versions": list(self.versions), "why": self.why, "seen": list(self.seen)}

    @staticmethod
    def from_json(data: Any) -> Decision | None:
        """A decision read from the file, or None when it is not one (ignored, never fatal)."""
        try:
            kind = str(data["kind"])
            if kind not in ("rollback", "abort", "promote"):
                return None
            return Decision(id=str(data["id"]), replica=str(data["replica"]), seq=int(data["seq"]),
                            at=float(data["at"]), kind=kind, versions=tuple(int(v) for v in data["versions"]),
                            why=str(data.get("why", "")), seen=tuple(str(s) for s in data.get("seen", ())))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class Replayed:
    weights: dict[int, float]
    stable: int
    notes: dict[int, str]
    overruled: list[Decision]  # promotions skipped: a stop of that version they had not seen


def _by(decision: Decision, local: str) -> str:
    return "" if decision.replica == local else f" (decided by replica {decision.replica})"


def replay(weights: dict[int, float], stable: int, decisions: Iterator[Decision] | list[Decision],
           local: str = "") -> Replayed:
    """The state after `decisions` (any order, duplicates allowed), starting from the policy's."""
    weights, notes = dict(weights), {}
    ordered = sorted({d.id: d for d in decisions}.values(), key=lambda d: d.order)
    stops: dict[int, set[str]] = {}  # version -> ids of the rollbacks/aborts of it
    for d in ordered:
        if d.kind in STOPS:
            for v in d.versions:
                stops.setdefault(v, set()).add(d.id)
    overruled = []
    for d in ordered:
        by = _by(d, local)
        if d.kind == "rollback":
            for v in d.versions:
                if v in weights and v != stable:
                    weights[v] = 0.0
                    notes[v] = f"rolled back{by}: {d.why}"
        elif d.kind == "abort":
            for v in d.versions:
                if v in weights and v != stable:
                    weights[v] = 0.0
                    notes[v] = f"aborted by the operator{by}"
        elif d.kind == "promote":
            v = d.versions[0] if d.versions else -1
            if v not in weights:
                continue
            if stops.get(v, set()) - set(d.seen):  # a stop of v it did not know of: the stop wins
                overruled.append(d)
                notes.setdefault(v, "")
                continue
            for other in weights:
                weights[other] = 100.0 if other == v else 0.0
                if other != v:
                    notes[other] = f"share moved to version {v}, promoted {d.why}{by}"
            stable = v
            notes[v] = f"promoted {d.why}{by}"
    for d in overruled:
        v = d.versions[0]
        extra = f"promotion {d.why}{_by(d, local)} overruled by a rollback or abort it had not seen"
        notes[v] = f"{notes[v]}; {extra}" if notes.get(v) else extra
    return Replayed(weights, stable, notes, overruled)


# -- the file --

def decisions_in(data: Any, digest: str) -> list[Decision] | None:
    """The decisions the file holds for this policy digest; None when it holds none in this format."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    section = (data.get("policies") or {}).get(digest)
    if not isinstance(section, dict):
        return None
    found = (Decision.from_json(item) for item in section.get("decisions") or ())
    return [d for d in found if d is not None]


def read_state(model_dir: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (a torn read cannot happen: renames)."""
    try:
        return json.loads((model_dir / STATE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    try:
        handle = open(model_dir / LOCK_FILENAME, "a+")  # noqa: SIM115 (closed below)
    except OSError:
        yield  # a read-only or odd file system: write without the lock (convergence still holds)
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        handle.close()  # releases the lock


def write_state(model_dir: Path, digest: str, mine: list[Decision],
                summary: Callable[[list[Decision]], dict[str, Any]]) -> list[Decision]:
    """Merge `mine` into the file under the lock and replace it atomically; returns the union for
    this digest (it may hold decisions of other replicas this one has not applied yet).
    OSError when the file cannot be written."""
    with _locked(model_dir):
        data = read_state(model_dir)
        policies: dict[str, Any] = {}
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("policies"), dict):
            policies = {k: v for k, v in data["policies"].items() if isinstance(v, dict)}
        union = {d.id: d for d in decisions_in(data, digest) or ()}
        union.update({d.id: d for d in mine})
        ordered = sorted(union.values(), key=lambda d: d.order)
        policies[digest] = {"updated": time.time(), "decisions": [d.to_json() for d in ordered],
                            **summary(ordered)}
        newest = sorted(policies, key=lambda k: float(policies[k].get("updated", 0) or 0), reverse=True)
        kept = {k: policies[k] for k in newest[:KEEP_POLICIES]}
        # The top-level digest/stable/weights/notes are what servers before format 2 read.
        body = {"format": FORMAT, "digest": digest, **summary(ordered), "policies": kept}
        temporary = model_dir / f"{STATE_FILENAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            temporary.write_text(json.dumps(body, indent=1), encoding="utf-8")
            os.replace(temporary, model_dir / STATE_FILENAME)
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()
        return ordered


Signature = tuple[int, int, int]


class StateWatcher:
    """Notices a changed `.rollout-state.json` by a stat (mtime, size, inode): called off the loop."""

    def __init__(self) -> None:
        self._seen: dict[Path, Signature | None] = {}

    def scan(self, dirs: dict[str, Path]) -> list[tuple[str, Any]]:
        """(model, parsed file) for each model whose file changed since the last scan."""
        changed = []
        for name, model_dir in dirs.items():
            try:
                st = os.stat(model_dir / STATE_FILENAME)
                signature: Signature | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                signature = None
            if self._seen.get(model_dir, None) == signature and model_dir in self._seen:
                continue
            self._seen[model_dir] = signature
            if signature is None:
                continue
            data = read_state(model_dir)
            if data is None:
                self._seen.pop(model_dir, None)  # look again next time
                continue
            changed.append((name, data))
        for gone in set(self._seen) - set(dirs.values()):
            del self._seen[gone]
        return changed
