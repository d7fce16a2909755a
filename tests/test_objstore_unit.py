"""Object-store repositories without a server: key rules, URL parsing, grouping into units, the
mirror's stability rule and atomic updates (against an in-memory store behind the same seam the
S3 and GCS stores implement), and the change detector's trust in mirrored models."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from server.repository.changes import ChangeDetector, snapshot_model
from server.repository.mirror import Mirror
from server.repository.objkeys import MODEL_FILES, ObjectInfo, group, key_problem
from server.repository.objstore import RemoteURL, StoreError, check_urls, missing_client, parse_url


class MemoryStore:
    """An object store in a dict: key -> bytes; the ETag is the MD5, as S3's for simple uploads."""

    def __init__(self, prefix: str = "repo/") -> None:
        self.url = RemoteURL("s3", "bucket", prefix)
        self.objects: dict[str, bytes] = {}
        self.downloads = 0
        self.fail: set[str] = set()  # keys whose download fails
        self.short: set[str] = set()  # keys whose download is cut short

    def put(self, files: dict[str, str | bytes]) -> None:
        for key, data in files.items():
            self.objects[self.url.prefix + key] = data.encode() if isinstance(data, str) else data

    def delete(self, *keys: str) -> None:
        for key in keys:
            del self.objects[self.url.prefix + key]

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for key, data in sorted(self.objects.items()):
            if key.startswith(prefix):
                yield ObjectInfo(key, len(data), hashlib.md5(data).hexdigest())

    def list_folders(self, prefix: str) -> list[str]:
        return sorted({k[len(prefix):].split("/")[0] for k in self.objects if k.startswith(prefix) and
                       "/" in k[len(prefix):]})

    def download(self, obj: ObjectInfo, out: BinaryIO) -> int:
        self.downloads += 1
        data = self.objects.get(obj.key)
        if data is None or hashlib.md5(data).hexdigest() != obj.token:
            raise StoreError(f"{obj.key} changed since it was listed")
        if obj.key in self.fail:
            raise StoreError(f"downloading {obj.key} failed: connection reset")
        if obj.key in self.short:
            data = data[:-1]
        out.write(data)
        return len(data)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden staging folders included, so leftovers show)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- keys and URLs --


@pytest.mark.parametrize("rel, problem", [
    ("m/1/model.onnx", ""),
    ("m/config.pbtxt", ""),
    ("m/1/.hidden", ""),
    ("m/1/..data", ""),
    ("", "empty"),
    ("m/../x", "'..' path component"),
    ("../x", "'..' path component"),
    ("m/./x", "'.' path component"),
    ("/etc/passwd", "absolute"),
    ("m//x", "empty path component"),
    ("m\\..\\x", "backslash"),
    ("m/1/a\0b", "NUL"),
    ("m/1/a\nb", "control character"),
    ("m/1/a\x7fb", "control character"),
    ("m/1/" + "a" * 256, "component longer than 255 bytes"),
    ("m/1/" + "é" * 128, "component longer than 255 bytes"),
    ("m/" + "/".join(["a" * 200] * 6), "longer than 1024 bytes"),
    ("m/1/\udc80", "not valid UTF-8"),
])
def test_key_problem(rel: str, problem: str) -> None:
    if problem:
        assert problem in key_problem(rel)
    else:
        assert key_problem(rel) == ""


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/some/prefix", RemoteURL("s3", "bucket", "some/prefix/")),
    ("s3://bucket/some/prefix/", RemoteURL("s3", "bucket", "some/prefix/")),
    ("s3://bucket", RemoteURL("s3", "bucket", "")),
    ("S3://bucket/p", RemoteURL("s3", "bucket", "p/")),
    ("s3://127.0.0.1:9000/bucket/p", RemoteURL("s3", "bucket", "p/", "http://127.0.0.1:9000")),
    ("s3://minio.local:9000/bucket", RemoteURL("s3", "bucket", "", "http://minio.local:9000")),
    ("s3://https://minio.local:9443/bucket/p", RemoteURL("s3", "bucket", "p/", "https://minio.local:9443")),
    ("s3://http://minio.local:9000/bucket/p", RemoteURL("s3", "bucket", "p/", "http://minio.local:9000")),
    ("gs://bucket/p/q", RemoteURL("gs", "bucket", "p/q/")),
])
def test_parse_url(text: str, expected: RemoteURL) -> None:
    assert parse_url(text) == expected


@pytest.mark.parametrize("text, message", [
    ("s3://", "needs a bucket"),
    ("gs:///p", "needs a bucket"),
    ("s3://https://bucket/p", "must be followed by host:port"),
    ("s3://user:hunter2@minio.local:9000/b", "credentials in an s3:// URL are not accepted"),
    ("s3://bucket/a/../b", "'..'"),
    ("s3://bucket/a//b", "empty"),
    ("ftp://bucket/p", "scheme"),
])
def test_parse_url_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(text)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_check_urls() -> None:
    check_urls(("s3://b/p", "gs://b/p"), "READY")
    with pytest.raises(ValueError, match="given twice"):
        check_urls(("s3://b/p", "s3://b/p/"))
    with pytest.raises(ValueError, match="ready-marker"):
        check_urls(("s3://b/p",), "../READY")


def test_a_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_client("s3") == "" and missing_client("gs") == ""
    monkeypatch.setitem(__import__("sys").modules, "boto3", None)
    assert missing_client("s3") == "s3:// model repositories need the boto3 package: pip install nereid[s3]"
    with pytest.raises(ValueError, match=r"pip install nereid\[s3\]"):
        check_urls(("s3://b/p",))
    monkeypatch.setitem(__import__("sys").modules, "google.cloud.storage", None)
    assert missing_client("gs") == \
        "gs:// model repositories need the google-cloud-storage package: pip install nereid[gs]"


# -- grouping --


def _group(keys: list[str], marker: str = ""):
    return group((ObjectInfo("repo/" + k, 1, "e") for k in keys), "repo/", marker)


def test_group_units() -> None:
    grouped = _group(["m/config.pbtxt", "m/labels.txt", "m/warmup/a", "m/1/model.onnx", "m/1/sub/x",
                      "m/2/model.onnx", "m/01/x", "n/3/model.onnx", "top-level-file", "m/", "m/1/",
                      ".hidden/1/model.onnx", "m/.staging-3/model.onnx"])
    units = {name: {part: sorted(e.rel for e in entries) for part, entries in parts.items()}
             for name, parts in grouped.units.items()}
    assert units == {
        "m": {MODEL_FILES: ["01/x", "config.pbtxt", "labels.txt", "warmup/a"], 1: ["model.onnx", "sub/x"],
              2: ["model.onnx"]},
        "n": {3: ["model.onnx"]},
    }
    assert grouped.refused == {} and grouped.tainted == set()


def test_group_refuses_and_taints() -> None:
    grouped = _group(["good/1/model.onnx", "evil/1/../../x", "evil/2/model.onnx", "../x", "..\\x/1/y",
                      "evil/1", "clash/1/a", "clash/1/a/b", "clash/2/model.onnx", "evil/x\\y", " /1/a"])
    assert set(grouped.refused) == {"repo/evil/1/../../x", "repo/../x", "repo/..\\x/1/y", "repo/evil/1",
                                    "repo/clash/1/a", "repo/evil/x\\y", "repo/ /1/a"}
    assert grouped.tainted == {("evil", 1), ("evil", MODEL_FILES), ("clash", 1)}
    assert sorted(grouped.units) == ["clash", "evil", "good"]
    assert 1 not in grouped.units["clash"] and 2 in grouped.units["clash"]


def test_group_ready_marker() -> None:
    grouped = _group(["m/config.pbtxt", "m/1/model.onnx", "m/1/READY", "m/2/model.onnx"], marker="READY")
    assert sorted(grouped.units["m"]) == [MODEL_FILES, 1]
    assert grouped.waiting == {("m", 2)}


# -- the mirror --


def test_poll_sync_takes_a_unit_only_once_its_listing_is_still(tmp_path: Path) -> None:
    store = MemoryStore()
    mirror = Mirror(store, tmp_path)
    store.put({"m/config.pbtxt": "c", "m/1/model.onnx": "one"})
    mirror.sync(stable=True)
    assert _files(tmp_path) == {}  # seen once: not yet
    mirror.sync(stable=True)
    assert _files(tmp_path) == {"m/config.pbtxt": b"c", "m/1/model.onnx": b"one"}

    store.put({"m/2/part0": "p"})  # an upload in progress: the listing keeps changing
    for i in range(1, 4):
        mirror.sync(stable=True)
        store.put({f"m/2/part{i}": "p"})
        assert not (tmp_path / "m" / "2").exists()
    store.put({"m/2/model.onnx": "two"})
    mirror.sync(stable=True)
    assert not (tmp_path / "m" / "2").exists()
    mirror.sync(stable=True)
    assert _files(tmp_path / "m" / "2") == {"model.onnx": b"two", **{f"part{i}": b"p" for i in range(4)}}


def test_versions_are_replaced_whole_and_removed(tmp_path: Path) -> None:
    store = MemoryStore()
    mirror = Mirror(store, tmp_path)
    store.put({"m/config.pbtxt": "c", "m/1/model.onnx": "one", "m/1/big.bin": "B" * 1000})
    mirror.sync(stable=False)
    big = tmp_path / "m" / "1" / "big.bin"
    inode = big.stat().st_ino
    downloads = store.downloads
    store.put({"m/1/model.onnx": "ONE"})
    mirror.sync(stable=False)
    assert _files(tmp_path) == {"m/config.pbtxt": b"c", "m/1/model.onnx": b"ONE", "m/1/big.bin": b"B" * 1000}
    assert store.downloads == downloads + 1  # the unchanged file is linked from the old copy
    assert big.stat().st_ino == inode

    store.put({"m/config.pbtxt": "c2", "m/labels.txt": "l"})
    mirror.sync(stable=False)
    assert (tmp_path / "m" / "config.pbtxt").read_bytes() == b"c2" and (tmp_path / "m" / "labels.txt").exists()
    store.delete("m/labels.txt", "m/1/model.onnx", "m/1/big.bin")
    mirror.sync(stable=False)
    assert _files(tmp_path) == {"m/config.pbtxt": b"c2"}
    store.delete("m/config.pbtxt")
    mirror.sync(stable=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_leaves_the_mirror_as_it_was(tmp_path: Path) -> None:
    store = MemoryStore()
    mirror = Mirror(store, tmp_path)
    store.put({"m/1/a": "a1", "m/1/b": "b1"})
    mirror.sync(stable=False)
    store.put({"m/1/a": "a2", "m/1/b": "b2"})
    store.fail.add("repo/m/1/b")
    mirror.sync(stable=False)
    assert _files(tmp_path) == {"m/1/a": b"a1", "m/1/b": b"b1"}  # no staging folder left either
    store.fail.clear()
    store.short.add("repo/m/1/b")
    mirror.sync(stable=False)
    assert _files(tmp_path) == {"m/1/a": b"a1", "m/1/b": b"b1"}
    store.short.clear()
    mirror.sync(stable=False)
    assert _files(tmp_path) == {"m/1/a": b"a2", "m/1/b": b"b2"}


def test_hostile_keys_are_never_written(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "mirror"
    root.mkdir(parents=True)
    store = MemoryStore()
    store.put({"good/1/model.onnx": "g", "../escape1": "x", "evil/1/../../escape2": "x", "/escape3": "x",
               "evil\\..\\..\\escape4": "x", "evil/2/../../../../escape5": "x", "evil/1/" + "a" * 300: "x",
               "evil/config.pbtxt": "c", "evil/1/model.onnx": "e", "evil/2/model.onnx": "e"})
    store.objects["repo//" + str(tmp_path / "escape6")] = b"x"  # an absolute path after the prefix
    mirror = Mirror(store, root)
    mirror.sync(stable=False)
    # evil's versions hold refused keys: not taken at all (its config is, it is a model-level file)
    assert _files(tmp_path) == {"a/b/mirror/good/1/model.onnx": b"g", "a/b/mirror/evil/config.pbtxt": b"c"}
    assert len(grouped_refused(store)) == 7


def grouped_refused(store: MemoryStore) -> dict[str, str]:
    return group(store.list_objects(store.url.prefix), store.url.prefix).refused


def test_sync_model_and_busy(tmp_path: Path) -> None:
    store = MemoryStore()
    mirror = Mirror(store, tmp_path)
    store.put({"m/1/x": "1", "n/1/x": "1"})
    mirror.sync_model("m")
    assert _files(tmp_path) == {"m/1/x": b"1"}
    mirror.sync(stable=True, busy=frozenset({"n"}))
    mirror.sync(stable=True, busy=frozenset({"n"}))
    assert _files(tmp_path) == {"m/1/x": b"1"}
    mirror.sync(stable=True)
    assert _files(tmp_path) == {"m/1/x": b"1", "n/1/x": b"1"}
    assert mirror.model_names() == ["m", "n"]


def test_the_detector_trusts_settled_models(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    detector = ChangeDetector()
    snap = {"m": snapshot_model(tmp_path / "m")}
    assert [s.name for s in detector.observe(snap, settled=frozenset({"m"})).apply] == ["m"]
    os.rmdir(tmp_path / "m" / "1")
    assert detector.observe({}).remove == ["m"]  # gone from a mirror: removed at once
    local = ChangeDetector()
    assert local.observe(snap).unsettled == ["m"]
    assert [s.name for s in local.observe(snap).apply] == ["m"]
    assert local.observe({}).remove == [] and local.observe({}).remove == ["m"]


def test_a_stopping_mirror_downloads_nothing_more(tmp_path: Path) -> None:
    store = MemoryStore()
    mirror = Mirror(store, tmp_path)
    store.put({"m/1/a": "a", "n/1/b": "b"})
    mirror.stopping.set()
    mirror.sync(stable=False)
    with pytest.raises(StoreError, match="stopping"):
        mirror._fill(tmp_path, frozenset(group(store.list_objects("repo/"), "repo/").units["m"][1]), None,
                     frozenset())
    assert store.downloads == 0 and _files(tmp_path) == {}
