"""Object keys of a repository on object storage -> safe relative paths, grouped into units. Pure.

An object store has no folders and no rename: a key is any string, written by
whoever may write to the bucket. Before a key becomes a file in the local mirror
it must be a plain relative path that can only land inside the mirror: no `..`
or `.` components, no empty components (`a//b`, a leading `/`), no backslash,
NUL or control characters, no component over NAME_MAX bytes and no key over
1,024 bytes (S3's own limit). Anything else is refused, never rewritten.

Keys are grouped into *units*, the parts that appear in the mirror whole
(docs/LIFECYCLE.md, "Repositories on object storage"): each version folder
`<model>/<N>/` is one unit, and the model's other files (config.pbtxt, labels,
warmup/...) together are another. A unit holding a refused key is *tainted*:
it is not taken until the key is gone, so a version is never loaded with a
file silently missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from server.errors import InvalidInput
from server.repository.layout import is_version_name
from server.repository.safepath import NAME_MAX, check_model_name

MAX_KEY_BYTES = 1024  # S3's longest key; the mirror root leaves room for it under PATH_MAX

# A unit's part: a version number, or MODEL_FILES for the model's other files.
MODEL_FILES = 0
Part = int


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing shows it. `token` names this content (S3's ETag, GCS's
    generation) so that a download gets exactly what was listed; `checksum` ("md5:<base64>"
    or "crc32c:<base64>", GCS) is verified after download where the store gives one."""

    key: str
    size: int
    token: str
    checksum: str = ""


@dataclass(frozen=True)
class Entry:
    """One file of a unit: its path inside the unit folder and the object it comes from."""

    rel: str
    obj: ObjectInfo


Listing = frozenset[Entry]
EMPTY: Listing = frozenset()


@dataclass
class Grouped:
    """One listing of a repository, grouped: model -> part -> entries, and what was refused."""

    units: dict[str, dict[Part, Listing]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # key -> why
    tainted: set[tuple[str, Part]] = field(default_factory=set)
    waiting: set[tuple[str, Part]] = field(default_factory=set)  # versions without the ready marker


def key_problem(rel: str) -> str:
    """Why the relative key `rel` can not be a path in the mirror ("" when it can)."""
    if not rel:
        return "it is empty"
    if "\0" in rel:
        return "it contains a NUL character"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in rel):
        return "it contains a control character"
    if "\\" in rel:
        return "it contains a backslash"
    if rel.startswith("/"):
        return "it is an absolute path"
    try:
        size = len(rel.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    for part in rel.split("/"):
        if part == "":
            return "it has an empty path component ('//')"
        if part in (".", ".."):
            return f"it has a '{part}' path component"
        if len(part.encode("utf-8")) > NAME_MAX:
            return f"it has a path component longer than {NAME_MAX} bytes"
    return ""


def shown(key: str, limit: int = 160) -> str:
    """A key as it may appear in a log line: escaped (no newlines or control characters from
    the bucket reach the log) and shortened."""
    text = ascii(key)
    return text if len(text) <= limit else text[:limit] + "...'"


def model_name_of(first: str) -> str | None:
    """The model a top-level folder name stands for, or None (hidden or not a valid name)."""
    if first.startswith("."):
        return None
    try:
        check_model_name(first)
    except InvalidInput:
        return None
    return first


def group(objects: Iterable[ObjectInfo], prefix: str, marker: str = "") -> Grouped:
    """Group a listing under `prefix` (empty or ending in "/") into units.

    Skipped without a word: folder placeholders (keys ending in "/"), files directly under
    the prefix, hidden models and hidden model-level entries (the scanner ignores them too).
    A version unit without the `marker` object (when one is set) is left out and noted as
    waiting.
    """
    grouped = Grouped()
    building: dict[tuple[str, Part], set[Entry]] = {}
    for obj in objects:
        if not obj.key.startswith(prefix) or obj.key.endswith("/"):
            continue
        rel = obj.key[len(prefix):]
        first, sep, rest = rel.partition("/")
        problem = key_problem(rel)
        if not sep or (first.startswith(".") and first not in (".", "..")):
            # A file at the repository's top (not a model) or in a hidden folder (the scan skips those
            # too): never written; said only when the key could not be written anyway.
            if problem:
                grouped.refused[obj.key] = problem
            continue
        name = model_name_of(first) if not key_problem(first) else None
        if name is None:
            grouped.refused[obj.key] = problem or "its model folder name is not a valid model name"
            continue
        second, sep2, inner = rest.partition("/")
        part: Part = int(second) if sep2 and is_version_name(second) else MODEL_FILES
        unit = (name, part)
        if problem:
            grouped.refused[obj.key] = problem
            grouped.tainted.add(unit)
            continue
        if part == MODEL_FILES:
            if second.startswith("."):
                continue
            if is_version_name(second):  # a file named like a version: no folder can go there
                grouped.refused[obj.key] = "a file has a version folder's name"
                grouped.tainted.add(unit)
                continue
            building.setdefault(unit, set()).add(Entry(rest, obj))
        else:
            building.setdefault(unit, set()).add(Entry(inner, obj))
    for unit, entries in building.items():
        clash = _file_and_folder(entries)
        if clash:
            for entry in entries:
                if entry.rel == clash:
                    grouped.refused[entry.obj.key] = "the same path is both a file and a folder"
            grouped.tainted.add(unit)
            continue
        name, part = unit
        if marker and part != MODEL_FILES and not any(e.rel == marker for e in entries):
            grouped.waiting.add(unit)
            continue
        grouped.units.setdefault(name, {})[part] = frozenset(entries)
    return grouped


def _file_and_folder(entries: set[Entry]) -> str:
    """A path in `entries` that is a file and also the folder of another file ("" if none)."""
    files = {e.rel for e in entries}
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                return folder
    return ""
