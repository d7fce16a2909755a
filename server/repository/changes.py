"""Change detection for a model directory: stamps, snapshots and the two-scan rule.

A *stamp* summarises a file tree by its newest mtime (ns), total size and file
count, all taken recursively. The mtime alone is not enough: `cp -p` and rsync
preserve mtimes, so a half-copied folder can have the same newest mtime as the
finished one; sizes and counts still grow while the copy runs.

The *two-scan rule* (docs/LIFECYCLE.md): the poller acts on a model only when
its snapshot is identical in two consecutive scans, i.e. nothing in it changed
for a whole poll interval. A model that vanished is removed only when it is
absent from two consecutive scans, so a `rm -rf m && cp -r new m` does not
unload it in between. Hidden entries (names starting with ".") are ignored
everywhere, which is what makes staging a copy in `<model>/.incoming/` and
renaming it into place safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from server.repository.layout import CONFIG_FILENAME, ModelDir, is_version_name


@dataclass(frozen=True)
class Stamp:
    """Newest mtime (ns), total bytes and number of files of a tree (a file is a tree of one)."""

    mtime_ns: int = 0
    size: int = 0
    files: int = 0

    def __add__(self, other: Stamp) -> Stamp:
        return Stamp(max(self.mtime_ns, other.mtime_ns), self.size + other.size, self.files + other.files)


MISSING = Stamp(-1, -1, -1)


def tree_stamp(path: Path) -> Stamp:
    """Stamp of a file, or of a directory and everything under it (symlinks followed, loops cut)."""
    try:
        info = os.stat(path)
    except OSError:
        return MISSING
    if not os.path.isdir(path):
        return Stamp(info.st_mtime_ns, info.st_size, 1)
    total = Stamp(info.st_mtime_ns, 0, 0)
    seen = {(info.st_dev, info.st_ino)}
    stack = [str(path)]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            total = total + Stamp(0, 0, 1)  # unreadable: counts, so a later fix shows as a change
            continue
        for entry in entries:
            try:
                st = entry.stat()  # follows symlinks, as a backend opening the file would
            except OSError:
                continue  # dangling symlink: the load will say the file is missing
            if entry.is_dir():
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    stack.append(entry.path)
                total = total + Stamp(st.st_mtime_ns, 0, 0)
            else:
                total = total + Stamp(st.st_mtime_ns, st.st_size, 1)
    return total


@dataclass(frozen=True)
class ModelSnapshot:
    """What one model directory looked like at one scan."""

    name: str
    path: Path
    config: Stamp  # config.pbtxt (MISSING when absent: auto-complete)
    extras: Stamp  # every other non-hidden, non-version entry: labels, warmup/, configs/ ...
    versions: Mapping[int, Stamp] = field(default_factory=dict)

    def model_dir(self) -> ModelDir:
        return ModelDir(name=self.name, path=self.path, versions=tuple(sorted(self.versions)))


def snapshot_model(path: Path, name: str | None = None) -> ModelSnapshot:
    """Stamp every part of `<repo>/<model>/` that a load would read."""
    extras = Stamp()
    config = MISSING
    versions: dict[int, Stamp] = {}
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.name == CONFIG_FILENAME:
            config = tree_stamp(Path(entry.path))
        elif is_version_name(entry.name) and entry.is_dir():
            versions[int(entry.name)] = tree_stamp(Path(entry.path))
        else:
            extras = extras + tree_stamp(Path(entry.path))
    return ModelSnapshot(name=name or path.name, path=path, config=config, extras=extras, versions=versions)


@dataclass
class Changes:
    """What one poll found: models to (re)apply and models to remove."""

    apply: list[ModelSnapshot] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)  # changing right now; looked at again next scan


class ChangeDetector:
    """The two-scan rule over successive scans of a repository. Pure: no I/O, no loading.

    `observe` is fed every scan's snapshots and answers which models changed
    since they were last handed out (and stayed still for a scan), and which
    disappeared for two scans in a row. Names in `busy` (an action still running
    for them) are left for a later scan, so nothing is lost or applied twice.
    """

    def __init__(self) -> None:
        self._previous: dict[str, ModelSnapshot] = {}
        self._applied: dict[str, ModelSnapshot] = {}
        self._absent_once: set[str] = set()
        self._settled: set[str] = set()  # names last seen settled (kept while they are absent)

    def observe(self, current: Mapping[str, ModelSnapshot], busy: frozenset[str] = frozenset(),
                settled: frozenset[str] = frozenset()) -> Changes:
        """`settled` names are already still (an object-store mirror shows only units whose listing
        stayed the same for a poll, mirror.py): they are applied, or removed, at first sight."""
        changes = Changes()
        for name, snap in sorted(current.items()):
            previous = self._previous.get(name)
            self._previous[name] = snap
            self._absent_once.discard(name)
            if name in busy:
                continue
            if previous != snap and name not in settled:
                changes.unsettled.append(name)
                continue
            if self._applied.get(name) != snap:
                self._applied[name] = snap
                changes.apply.append(snap)
        self._settled = (self._settled - set(current)) | set(settled)
        for name in sorted(set(self._previous) - set(current)):
            if name in busy:
                continue
            if name in self._absent_once or name in self._settled:
                self._absent_once.discard(name)
                self._settled.discard(name)
                self._previous.pop(name, None)
                if self._applied.pop(name, None) is not None:
                    changes.remove.append(name)
            else:
                self._absent_once.add(name)
        return changes

    def forget(self, name: str) -> None:
        """Hand `name` out again at its next stable scan (e.g. after a failed action was retried)."""
        self._applied.pop(name, None)
