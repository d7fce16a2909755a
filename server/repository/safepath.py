"""Names and paths that come from clients or configs must never leave their folder.

Two kinds of names are checked here, and every refusal is INVALID_ARGUMENT:

- **Model names** on the load/unload RPCs (`check_model_name`), with Triton's rules and
  texts, and client-named override files (`override_relpath`, `override_target`).
- **Files a model config names** (`confine`): the model file, TensorRT's per-GPU files,
  label files, warmup and initial-state data, custom-op libraries, Python's execution
  environment. Whether the config came from disk or from a load override, each must
  resolve, symlinks followed, inside the model's own folder (`<repo>/<model>/`, or the
  private override directory), and a file that is read must be a regular file
  (`require_regular`): opening a FIFO blocks forever, a device file is not a model.

`confine` decides without ever looking outside the folder: it first compares the
normalised text, then follows the path one component at a time from the folder's real
location, reading only entries inside it (a symlink's target is read, never followed
out). So the answer, and its text, are the same whether an outside path exists or not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from server.errors import ConfigError, InvalidInput

# Triton's whitespace set (core src/model_repository_manager/model_repository_manager.cc).
_WHITESPACE = " \t\n\v\f\r"
# Longest file name on the filesystems a repository lives on (NAME_MAX): a longer model name
# can never be a folder, and asking the filesystem about it fails with ENAMETOOLONG.
NAME_MAX = 255
PATH_MAX = 4096  # and the longest path (Linux PATH_MAX)
# As the kernel: more symlinks than this on one path is a loop (ELOOP).
_MAX_LINKS = 40


def check_model_name(name: str) -> str:
    """A model name is one plain directory name inside the repository.

    Texts follow Triton's `ValidateModelName` (triton-inference-server/core,
    src/model_repository_manager/model_repository_manager.cc): "model name must not be
    empty", "model name must not contain only whitespace characters", and "invalid model
    name '<name>', model name must not contain path traversal characters". Triton's
    current check calls any name that merely contains ".." traversal; here only names that
    can traverse are refused ("." and "..", or a name with "/" or "\\"), so `...` and
    `..my_model` are valid folder names, loadable by name (the repository scan skips hidden
    folders, docs/LIFECYCLE.md).
    """
    if not name:
        raise InvalidInput("model name must not be empty")
    if not name.strip(_WHITESPACE):
        raise InvalidInput("model name must not contain only whitespace characters")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise InvalidInput(f"invalid model name '{name}', model name must not contain path traversal characters")
    if "\0" in name:
        raise InvalidInput(f"invalid model name {name!r}, model name must not contain NUL characters")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX:
        raise InvalidInput(
            f"invalid model name '{name[:32]}...' ({size} bytes), a model name is a folder name "
            f"of at most {NAME_MAX} bytes"
        )
    return name


def is_within(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, is `root` or lies under it."""
    try:
        path.resolve(strict=False).relative_to(root.resolve(strict=False))
    except ValueError:
        return False
    return True


def find_model_dir(name: str, repositories: tuple[Path, ...]) -> Path | None:
    """The directory of model `name` in the repositories, refusing one that escapes them."""
    check_model_name(name)
    for root in repositories:
        candidate = root / name
        if candidate.is_dir():
            if not is_within(candidate, root):
                raise InvalidInput(
                    f"model '{name}': {candidate} resolves to {candidate.resolve()}, outside the model "
                    f"repository {root}; refusing to load it"
                )
            return candidate
    return None


def override_relpath(key: str) -> PurePosixPath:
    """`file:<version>/<name>` -> the relative path it names inside the override directory."""
    raw = key[len("file:"):] if key.startswith("file:") else key
    if not raw:
        raise InvalidInput(f"override '{key}': empty path; expected file:<version>/<file name>")
    if "\\" in raw or "\0" in raw:
        raise InvalidInput(f"override '{key}': the path may not contain '\\' or NUL")
    path = PurePosixPath(raw)
    if path.is_absolute() or raw.startswith("/"):
        raise InvalidInput(f"override '{key}': absolute paths are not allowed; expected file:<version>/<file name>")
    parts = raw.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidInput(
            f"override '{key}': '.', '..' and empty path components are not allowed; "
            "expected file:<version>/<file name>"
        )
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in parts) or \
            len(raw.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise InvalidInput(
            f"override '{key[:80]}...': a path component longer than {NAME_MAX} bytes or a path longer than "
            f"{PATH_MAX} bytes cannot be a file name")
    return path


def override_target(base: Path, key: str) -> Path:
    """Where the override file `key` goes under `base`, checked to stay inside it on disk too."""
    target = base.joinpath(*override_relpath(key).parts)
    if not is_within(target, base):
        raise InvalidInput(f"override '{key}' resolves outside the override model directory")
    return target


# -- files named by a model config --


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
