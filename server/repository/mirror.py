"""Mirror one object-store repository into a local folder, one whole unit at a time.

The rest of the server only ever sees local folders: the scans, the poller and
the loads read the mirror. A *unit* (objkeys.py) is a version folder
`<model>/<N>/` or the model's other files. The rules (docs/LIFECYCLE.md,
"Repositories on object storage"):

- **Complete before visible.** A version is downloaded into a hidden staging
  folder next to its place (`<model>/.nereid-staging-N-*`, hidden names are
  ignored by the scan), every file checked against the listing (its size; S3's
  ETag through If-Match, GCS's generation and checksum), then renamed into place
  in one step; a replaced version is first moved aside, then deleted. Model files
  are each replaced by a rename. A failed download leaves the mirror as it was.
- **Stable before taken (poll mode).** A unit is taken only once its listing
  (keys, sizes, ETags or generations) is the same in two consecutive polls, the
  rule poll mode applies to local folders; with a ready marker set, a version
  also needs that marker object. Removals follow the same rule. `sync(stable=False)`
  (startup in `none` mode, explicit loads) takes the listing as it is.
- **Keys never leave the mirror.** Refused keys (objkeys.key_problem) are logged
  once and never written; every file is created with O_EXCL|O_NOFOLLOW inside a
  staging folder this process just made.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from server.repository.objkeys import EMPTY, MODEL_FILES, Entry, Grouped, Listing, Part, group, shown
from server.repository.objstore import ObjectStore, StoreError

log = logging.getLogger("nereid.objstore")

MAX_REPORTED = 1000  # refused keys logged one by one; beyond that, one line


class Mirror:
    def __init__(self, store: ObjectStore, root: Path, marker: str = "") -> None:
        self.store = store
        self.root = root
        self.marker = marker
        self.display = store.url.display
        self.stopping = threading.Event()  # shutdown: stop downloading at the next file
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._mirrored: dict[str, dict[Part, Listing]] = {}
        self._previous: dict[str, dict[Part, Listing]] = {}
        self._refused: set[str] = set()  # keys already logged as refused
        self._noted: dict[tuple[str, Part], tuple[str, int]] = {}  # unit -> (what was said, of which listing)

    # -- entry points --

    def sync(self, stable: bool = True, busy: frozenset[str] = frozenset()) -> None:
        """Bring the whole mirror up to date with one listing. Models in `busy` (an action is
        loading them) are left for a later sync. StoreError if the listing fails."""
        grouped = group(self.store.list_objects(self.store.url.prefix), self.store.url.prefix, self.marker)
        self._report(grouped)
        with self._guard:
            names = sorted(set(grouped.units) | set(self._mirrored) | set(self._previous)
                           | {name for name, _ in grouped.tainted})
        for name in names:
            if self.stopping.is_set():
                return
            current = grouped.units.get(name, {})
            previous = self._previous.get(name, {})
            if current:
                self._previous[name] = current
            else:
                self._previous.pop(name, None)
            if name in busy:
                continue
            with self._lock_for(name):
                self._update(name, current, previous if stable else None, grouped)

    def sync_model(self, name: str) -> None:
        """Bring one model up to date as it is now (an explicit load). StoreError if listing fails."""
        prefix = self.store.url.prefix
        grouped = group(self.store.list_objects(f"{prefix}{name}/"), prefix, self.marker)
        self._report(grouped)
        with self._lock_for(name):
            self._update(name, grouped.units.get(name, {}), None, grouped)

    def model_names(self) -> list[str]:
        """The model folder names in the store now (RepositoryIndex). StoreError if listing fails."""
        return self.store.list_folders(self.store.url.prefix)

    # -- one model --

    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _update(self, name: str, current: dict[Part, Listing], previous: dict[Part, Listing] | None,
                grouped: Grouped) -> None:
        with self._guard:
            mirrored = dict(self._mirrored.get(name, {}))
        tainted = {part for unit, part in grouped.tainted if unit == name}
        for part in sorted(set(current) | set(mirrored) | set(previous or {}) | tainted):
            now = current.get(part, EMPTY)
            what = _unit_name(name, part)
            if part in tainted:
                self._note(name, part, "tainted", now, logging.ERROR,
                           "%s: not taken, it holds a refused object key (see above)", what)
                continue
            if previous is not None and previous.get(part, EMPTY) != now:
                self._note(name, part, "changing", now, logging.DEBUG,
                           "%s: still changing; taken once its listing stays the same for a poll", what)
                continue
            if mirrored.get(part, EMPTY) == now:
                continue
            try:
                self._apply(name, part, mirrored.get(part, EMPTY), now)
            except (StoreError, OSError) as exc:
                self._note(name, part, "failed", now, logging.WARNING,
                           "%s: not updated (tried again at the next sync): %s", what, exc)
                continue
            with self._guard:
                self._noted.pop((name, part), None)
            if now:
                mirrored[part] = now
            else:
                mirrored.pop(part, None)
        with self._guard:
            if mirrored:
                self._mirrored[name] = mirrored
            else:
                self._mirrored.pop(name, None)
        if not mirrored and (self.root / name).exists():
            self._discard(self.root / name, f".nereid-old-{name}-")
            log.info("%s: model '%s' removed from the mirror", self.display, name)

    def _apply(self, name: str, part: Part, old: Listing, new: Listing) -> None:
        model_dir = self.root / name
        model_dir.mkdir(mode=0o700, exist_ok=True)
        if part == MODEL_FILES:
            self._apply_model_files(name, model_dir, old, new)
            return
        target = model_dir / str(part)
        if not new:
            self._discard(target, f".nereid-old-{part}-")
            log.info("%s: model '%s' version %d: removed", self.display, name, part)
            return
        staging = Path(tempfile.mkdtemp(prefix=f".nereid-staging-{part}-", dir=model_dir))
        try:
            reused = self._fill(staging, new, target, old)
            aside = None
            if target.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".nereid-old-{part}-", dir=model_dir))
                os.rename(target, aside / "v")
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        log.info("%s: model '%s' version %d: %s (%d files, %d bytes downloaded)", self.display, name, part,
                 "replaced" if old else "mirrored", len(new), sum(e.obj.size for e in new - reused))

    def _apply_model_files(self, name: str, model_dir: Path, old: Listing, new: Listing) -> None:
        """Config, labels, warmup files...: staged whole, then each renamed over its old copy."""
        changed = new - old
        staging = Path(tempfile.mkdtemp(prefix=".nereid-staging-files-", dir=model_dir))
        try:
            self._fill(staging, changed, None, EMPTY)
            for rel in sorted({e.rel for e in old} - {e.rel for e in new}, reverse=True):
                _remove_file(model_dir, rel)
            for entry in sorted(changed, key=lambda e: e.rel):
                dest = _inside(model_dir, entry.rel)
                _make_parents(model_dir, entry.rel)
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(_inside(staging, entry.rel), dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        removed = len({e.rel for e in old} - {e.rel for e in new})
        if old:
            log.info("%s: model '%s' files: updated (%d changed, %d removed)", self.display, name,
                     len(changed), removed)
        else:
            log.info("%s: model '%s' files: mirrored (%d files)", self.display, name, len(changed))

    def _fill(self, staging: Path, entries: Listing, previous_dir: Path | None, old: Listing) -> Listing:
        """Download `entries` into `staging`; files unchanged since `old` are hard-linked from
        `previous_dir` instead (the mirror never edits a file in place). Returns the reused ones."""
        reused: set[Entry] = set()
        for entry in sorted(entries, key=lambda e: e.rel):
            if self.stopping.is_set():
                raise StoreError("the server is stopping")
            dest = _inside(staging, entry.rel)
            _make_parents(staging, entry.rel)
            if previous_dir is not None and entry in old:
                try:
                    os.link(_inside(previous_dir, entry.rel), dest, follow_symlinks=False)
                    reused.add(entry)
                    continue
                except OSError:
                    pass
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                written = self.store.download(entry.obj, out)
            if written != entry.obj.size:
                raise StoreError(f"{shown(entry.obj.key)}: downloaded {written} bytes, the listing said "
                                 f"{entry.obj.size}")
        return frozenset(reused)

    def _discard(self, path: Path, prefix: str) -> None:
        """Make `path` vanish in one rename, then delete it."""
        if not path.exists():
            return
        aside = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        os.rename(path, aside / "x")
        shutil.rmtree(aside, ignore_errors=True)

    # -- logging --

    def _report(self, grouped: Grouped) -> None:
        for key, why in sorted(grouped.refused.items()):
            with self._guard:
                if key in self._refused:
                    continue
                if len(self._refused) >= MAX_REPORTED:
                    break
                self._refused.add(key)
                full = len(self._refused) == MAX_REPORTED
            log.error("%s: refusing object key %s: %s", self.display, shown(key), why)
            if full:
                log.error("%s: more refused object keys are not logged", self.display)
        for name, part in sorted(grouped.waiting):
            self._note(name, part, "waiting", EMPTY, logging.INFO, "%s: waits for its ready marker '%s'",
                       _unit_name(name, part), self.marker)

    def _note(self, name: str, part: Part, kind: str, listing: Listing, level: int, message: str,
              *args: object) -> None:
        """Log `message` about a unit once per state (kind and listing), not at every poll."""
        state = (kind, hash(listing))
        with self._guard:
            if self._noted.get((name, part)) == state:
                return
            self._noted[(name, part)] = state
        log.log(level, "%s: " + message, self.display, *args)


def _unit_name(name: str, part: Part) -> str:
    return f"model '{name}' files" if part == MODEL_FILES else f"model '{name}' version {part}"


def _inside(base: Path, rel: str) -> Path:
    """`base/rel`, refusing anything that would not stay under `base` (objkeys already refused
    such keys: this is the second lock on the door)."""
    joined = os.path.normpath(os.path.join(base, rel))
    if not joined.startswith(str(base) + os.sep):
        raise StoreError(f"refusing to write {shown(rel)} outside {base}")
    return Path(joined)


def _make_parents(base: Path, rel: str) -> None:
    """Create the folders of `rel` under `base`, one by one, never through a symlink."""
    current = base
    for part in rel.split("/")[:-1]:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            current.unlink()
        if not current.exists():
            current.mkdir(mode=0o700)


def _remove_file(base: Path, rel: str) -> None:
    """Delete `base/rel` and the folders it leaves empty (up to `base`)."""
    path = _inside(base, rel)
    if path.is_symlink() or path.is_file():
        path.unlink()
    parent = path.parent
    while parent != base and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
