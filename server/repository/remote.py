"""The object-store repositories of one server: a mirror folder each under the cache root.

`--model-repository s3://...` or `gs://...` becomes a mirror (mirror.py) in
`<cache root>/<scheme>-<bucket>-<hash>/`, and that folder is one more local
repository for the scans, the poller and the loads. The cache root is
`--model-repository-cache` or, by default, a private temporary folder (mode 0700)
deleted at shutdown. Each mirror folder is emptied when the server starts (its
contents are rebuilt from the store, so nothing left by an earlier or crashed
run is ever served) and deleted at shutdown; a lock file next to it stops two
servers from sharing one.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from server.repository.mirror import Mirror
from server.repository.objkeys import MAX_KEY_BYTES, model_name_of
from server.repository.objstore import StoreError, open_store, parse_url
from server.repository.safepath import PATH_MAX

log = logging.getLogger("nereid.objstore")


class RemoteRepositories:
    def __init__(self) -> None:
        self.mirrors: list[Mirror] = []
        self._cache_root: Path | None = None
        self._owned_root = False
        self._locks: list[int] = []
        self._errors: dict[str, str] = {}  # mirror display -> the last sync error logged
        self._guard = threading.Lock()

    @classmethod
    def open(cls, urls: Sequence[str], cache_root: Path | None, marker: str = "") -> RemoteRepositories:
        """Open every store, make and lock each mirror folder, and list each store once (so an
        unreachable store or missing credentials stop the server at startup, as a missing
        local repository does). StoreError says what failed; nothing is left behind then."""
        remote = cls()
        if not urls:
            return remote
        atexit.register(remote.close)  # also when the server stops before its orderly shutdown
        try:
            remote._open(urls, cache_root, marker)
        except BaseException:
            remote.close()
            raise
        return remote

    def _open(self, urls: Sequence[str], cache_root: Path | None, marker: str) -> None:
        try:
            parsed = [parse_url(url) for url in urls]
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        stores = [open_store(url) for url in parsed]
        if cache_root is None:
            self._cache_root = Path(tempfile.mkdtemp(prefix="nereid-repository-cache-"))
            self._owned_root = True
        else:
            try:
                cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create --model-repository-cache folder '{cache_root}': {exc.strerror}") from None
            self._cache_root = cache_root.resolve()
        for store in stores:
            folder = self._cache_root / folder_name(store.url.display, store.url.scheme, store.url.bucket)
            if len(str(folder)) + 1 + MAX_KEY_BYTES >= PATH_MAX:
                raise StoreError(f"cache folder path '{folder}' is too long to hold any object key "
                                 f"(at most {PATH_MAX - MAX_KEY_BYTES - 2} bytes)")
            self._lock(folder)
            try:
                if folder.exists() or folder.is_symlink():
                    shutil.rmtree(folder)  # refuses a symlink: never deletes through one
                folder.mkdir(mode=0o700)
            except OSError as exc:
                raise StoreError(f"cannot prepare cache folder '{folder}': {exc}") from None
            mirror = Mirror(store, folder, marker)
            self.mirrors.append(mirror)
            names = mirror.model_names()
            log.info("model repository %s: %d model folder(s), mirrored in %s", store.url.display, len(names), folder)

    def _lock(self, folder: Path) -> None:
        path = folder.with_name(f".{folder.name}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create lock file '{path}': {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"cache folder '{folder}' is in use by another Nereid server (or given twice); "
                             "give each server its own --model-repository-cache") from None
        self._locks.append(fd)

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(m.root for m in self.mirrors)

    def holds(self, path: Path) -> bool:
        """Whether `path` is inside one of the mirror folders."""
        return any(path.is_relative_to(root) for root in self.roots)

    def sync(self, stable: bool, busy: frozenset[str] = frozenset()) -> None:
        """Update every mirror; a store that cannot be listed is logged (once per error) and its
        mirror kept as it is, so its models keep serving."""
        for mirror in self.mirrors:
            try:
                mirror.sync(stable, busy)
            except StoreError as exc:
                if self._failed(mirror.display, exc):
                    log.error("model repository %s: %s; serving what was mirrored before", mirror.display, exc)
                continue
            if self._recovered(mirror.display):
                log.info("model repository %s can be listed again", mirror.display)

    def _failed(self, what: str, exc: StoreError) -> bool:
        """Note a failure of `what`; whether it is news (not the error logged last time)."""
        with self._guard:
            said = self._errors.get(what)
            self._errors[what] = str(exc)
        return said != str(exc)

    def _recovered(self, what: str) -> bool:
        with self._guard:
            return self._errors.pop(what, None) is not None

    def sync_model(self, name: str) -> None:
        """Update one model in every mirror as it is now (explicit loads); StoreError on failure."""
        for mirror in self.mirrors:
            mirror.sync_model(name)

    def names(self) -> set[str]:
        """Model folder names in the stores now (RepositoryIndex); a store that cannot be listed
        adds nothing (its mirror folder is listed with the local repositories anyway)."""
        names: set[str] = set()
        for mirror in self.mirrors:
            try:
                names.update(n for n in mirror.model_names() if model_name_of(n) is not None)
            except StoreError as exc:
                if self._failed(f"index {mirror.display}", exc):
                    log.warning("model repository %s: %s; the index shows the mirror", mirror.display, exc)
                continue
            self._recovered(f"index {mirror.display}")
        return names

    def stop(self) -> None:
        """Shutdown: downloads in progress stop at their next file, no more syncs start."""
        for mirror in self.mirrors:
            mirror.stopping.set()

    def close(self) -> None:
        """Delete the mirror folders (and the cache root when it is ours); release the locks."""
        for mirror in self.mirrors:
            shutil.rmtree(mirror.root, ignore_errors=True)
        if self._owned_root and self._cache_root is not None:
            shutil.rmtree(self._cache_root, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)
        self.mirrors, self._locks, self._owned_root = [], [], False


def folder_name(display: str, scheme: str, bucket: str) -> str:
    """`<scheme>-<bucket>-<hash of the URL>`: readable, and distinct for distinct URLs."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", bucket)[:63]
    return f"{scheme}-{readable}-{hashlib.sha256(display.encode()).hexdigest()[:12]}"
