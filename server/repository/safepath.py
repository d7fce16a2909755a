"""Names and paths that come from clients or configs must never leave their folder.

Model names on the load/unload RPCs (`check_model_name`), with Triton's rules and texts,
and client-named override files (`override_relpath`, `override_target`); every refusal is
INVALID_ARGUMENT. Files a model config names are confined by `server/confine.py`, which the
core uses too when it reads label and warmup files.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from server.errors import InvalidInput

# Triton's whitespace set (core src/model_repository_manager/model_repository_manager.cc).
_WHITESPACE = " \t\n\v\f\r"
# Longest file name on the filesystems a repository lives on (NAME_MAX): a longer model name
# can never be a folder, and asking the filesystem about it fails with ENAMETOOLONG.
NAME_MAX = 255
PATH_MAX = 4096  # and the longest path (Linux PATH_MAX)


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
