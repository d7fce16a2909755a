"""Files a model config names must never leave the model's folder.

The model file, TensorRT's per-GPU files, label files, warmup and initial-state data,
custom-op libraries, Python's execution environment: whether the config came from disk or
from a load override, each must resolve, symlinks followed, inside the model's own folder
(`<repo>/<model>/`, or the private override directory), and a file that is read must be a
regular file (`require_regular`): opening a FIFO blocks forever, a device file is not a model.

The repository checks every such name once, when it normalises a config
(server/repository/config_paths.py); the core checks again when it reads a file (labels,
warmup data), since the disk may have changed. Both use this module, which depends on
nothing but the error tree, so neither side reaches into the other.

`confine` decides without ever looking outside the folder: it first compares the
normalised text, then follows the path one component at a time from the folder's real
location, reading only entries inside it (a symlink's target is read, never followed
out). So the answer, and its text, are the same whether an outside path exists or not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from server.errors import ConfigError

# As the kernel: more symlinks than this on one path is a loop (ELOOP).
_MAX_LINKS = 40


class _Outside(Exception):
    """The path leaves the folder (raised before anything outside it is looked at)."""


class _Loop(Exception):
    """Too many symlinks inside the folder (ELOOP)."""


def _outside_error(field: str, value: str) -> ConfigError:
    # One text for every way of leaving the folder, and nothing resolved in it: the answer
    # must not tell whether something exists outside.
    return ConfigError(
        f"{field} '{value}' is outside the model's folder: every file a model config names must "
        "lie inside the model's own folder (symlinks followed)"
    )


def _strip_prefix(path: str, prefixes: tuple[str, ...]) -> list[str] | None:
    """The components of absolute `path` after one of `prefixes` (compared component by
    component, without normalising: `a/link/..` is not `a`), or None."""
    parts = path.split("/")
    for prefix in prefixes:
        head = [p for p in prefix.split("/") if p]
        body = [p for p in parts if p not in ("", ".")]
        if body[:len(head)] == head:
            return body[len(head):]
    return None


def _walk(root: Path, prefixes: tuple[str, ...], parts: list[str]) -> Path:
    """Follow `parts` from `root` (a real, resolved folder) as the kernel would, but never
    look at anything outside `root`: raises _Outside as soon as the path would leave it."""
    current = root
    pending = list(parts)
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current == root:
                raise _Outside
            current = current.parent
            continue
        candidate = current / part
        try:
            info = os.lstat(candidate)
        except OSError:  # missing (or a file used as a folder): the kernel stops here too
            rest = candidate.joinpath(*pending)  # keeps "..": `missing/../x` must stay missing
            flat = Path(os.path.normpath(rest))
            if flat != root and root not in flat.parents:
                raise _Outside from None
            return rest
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            raise _Loop
        target = os.readlink(candidate)
        if target.startswith("/"):
            inside = _strip_prefix(target, prefixes)
            if inside is None:
                raise _Outside
            current, pending = root, inside + pending
        else:
            pending = target.split("/") + pending
    return current


def confine(root: Path, value: str, field: str, base: str = "", keep_in_base: bool = False) -> Path:
    """The file `value` names, resolved, checked to lie inside the model folder `root`.

    A relative `value` is taken relative to `root/base` (e.g. the version folder for a model
    file); an absolute one must name a place inside `root`. With `keep_in_base` it must also
    stay textually inside `base` (warmup files live in `<model>/warmup/`). Raises ConfigError
    otherwise, with a text that is the same whether the outside path exists or not.
    """
    if "\0" in value:
        raise ConfigError(f"{field} {value!r}: a file name cannot contain NUL")
    named = os.path.abspath(root)
    start = os.path.join(named, base) if base else named
    text = os.path.normpath(os.path.join(start, value))  # value absolute: the join keeps value only
    if keep_in_base and text != start and not text.startswith(start.rstrip("/") + "/"):
        raise _outside_error(field, value)
    if text != named and not text.startswith(named.rstrip("/") + "/"):
        real = os.path.realpath(named)
        if text != real and not text.startswith(real.rstrip("/") + "/"):
            raise _outside_error(field, value)
    real_root = Path(os.path.realpath(named))
    prefixes = tuple(dict.fromkeys((str(real_root), named)))
    if value.startswith("/"):
        inside = _strip_prefix(value, prefixes)
        if inside is None:
            raise _outside_error(field, value)
        parts = inside
    else:
        parts = [*(base.split("/") if base else []), *value.split("/")]
    try:
        return _walk(real_root, prefixes, parts)
    except _Outside:
        raise _outside_error(field, value) from None
    except _Loop:  # only links inside the folder were followed: this says nothing about outside
        raise ConfigError(f"{field} '{value}': too many levels of symbolic links") from None


def require_regular(path: Path, field: str, value: str) -> bool:
    """Whether the (confined) file exists; ConfigError if it exists but is not a regular file
    (a FIFO would block whoever opens it forever; devices and sockets are not model files)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"{field} '{value}': cannot access it: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{field} '{value}' is not a regular file")
    return True
