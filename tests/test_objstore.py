"""Model repositories on S3: real Nereid servers reading a real S3 API (moto's server on 127.0.0.1).

The three control modes work on an s3:// repository as on a folder; poll mode follows uploads and
deletions, never takes a version whose objects are still arriving, and, with a ready marker,
waits for it; hostile object keys are refused and nothing is written outside the cache; the
credentials never reach the log; a missing bucket or client library stops the server with one line.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lifecycle_util import add_config, add_model_bytes, index_of, infer_fp32, states, wait_until
from objstore_util import ACCESS_KEY, S3_ENV, SECRET_KEY, SESSION_TOKEN, MotoS3, delete_prefix, put
from util import PYTHON, ROOT, client, expect_error, identity_config, require, scaled

from server.repository.objstore import StoreError, open_store, parse_url

require("onnx")  # the models whose answers reveal their version are ONNX models
require("onnxruntime")


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def s3(moto: MotoS3, monkeypatch: pytest.MonkeyPatch):
    """(boto3 client, a new bucket); the servers started by the test get the fake credentials and,
    through AWS_ENDPOINT_URL, the moto endpoint."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    return moto.client(), moto.bucket()


def _x() -> np.ndarray:
    return np.arange(4, dtype=np.float32)


def _answer(c, name: str = "m", version: str = "") -> float:
    """What the add model of `name` adds (its version number, see lifecycle_util.add_model_bytes)."""
    return float(infer_fp32(c, name, _x(), version=version).as_numpy("OUTPUT0")[0])


def _add_model(name: str, version: int) -> dict[str, bytes | str]:
    return {f"repo/{name}/config.pbtxt": add_config(name),
            f"repo/{name}/{version}/model.onnx": add_model_bytes(version)}


def _ready(c, name: str = "m") -> set[str]:
    """The READY versions of a model."""
    return {version for version, state in states(c, name).items() if state == "READY"}


def _mirror(cache: Path) -> Path:
    """The one mirror folder under a --model-repository-cache folder."""
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


def _no_secrets(log: str) -> None:
    assert SECRET_KEY not in log and SESSION_TOKEN not in log


def test_none_mode_serves_an_s3_repository(s3, moto: MotoS3, tmp_path: Path, server_factory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint as tritonserver spells it (s3://host:port/bucket/prefix); the mirror is what
    loads, and it is gone after shutdown."""
    s3c, bucket = s3
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    put(s3c, bucket, {**_add_model("m", 1), "repo/id/config.pbtxt": identity_config("id", [("INPUT0", "FP32", [4])]),
                      "repo/id/1/README": "an identity model needs no file", "repo/id/labels.txt": "a\nb\n"})
    cache = tmp_path / "cache"
    srv = server_factory([f"s3://127.0.0.1:{moto.port}/{bucket}/repo"], "--model-repository-cache", str(cache),
                         "--log-verbose", "1")
    c = client(srv)
    assert c.is_server_ready()
    assert states(c, "m") == {"1": "READY"} and states(c, "id") == {"1": "READY"}
    assert _answer(c) == 1.0
    mirror = _mirror(cache)
    assert (mirror / "m" / "1" / "model.onnx").read_bytes() == add_model_bytes(1)
    assert (mirror / "id" / "labels.txt").read_text() == "a\nb\n"
    assert f"model repository s3://http://127.0.0.1:{moto.port}/{bucket}/repo/: 2 model folder(s)" in srv.log
    put(s3c, bucket, _add_model("m", 2))  # none mode: nothing changes afterwards
    time.sleep(scaled(0.5))
    assert _answer(c) == 1.0
    srv.stop()
    assert not mirror.exists()
    _no_secrets(srv.log)


def test_poll_mode_follows_the_bucket(s3, tmp_path: Path, server_factory) -> None:
    """A version whose objects keep arriving is not taken (nor even mirrored) while they arrive; once
    the listing stays the same for a poll it is; a removed version is retired, a removed model unloaded."""
    s3c, bucket = s3
    put(s3c, bucket, _add_model("m", 1))
    cache = tmp_path / "cache"
    # Long enough that this test, uploading every 1/20 of it, never pauses for a whole interval.
    poll = scaled(1.0)
    srv = server_factory([f"s3://{bucket}/repo"], "--model-control-mode", "poll", "--repository-poll-secs",
                         str(poll), "--model-repository-cache", str(cache), "--log-verbose", "1")
    c = client(srv)
    assert states(c, "m") == {"1": "READY"} and _answer(c) == 1.0  # startup: two polls, then loaded
    version2 = _mirror(cache) / "m" / "2"

    # An upload in progress: a new object every 1/20 of a poll interval, for four intervals.
    deadline = time.monotonic() + 4 * poll
    i = 0
    while time.monotonic() < deadline:
        put(s3c, bucket, {f"repo/m/2/part-{i}": b"\0" * 64})
        i += 1
        assert not version2.exists(), f"version 2 mirrored while its objects were still arriving (part {i})"
        time.sleep(poll / 20)
    assert _ready(c) == {"1"}
    put(s3c, bucket, {"repo/m/2/model.onnx": add_model_bytes(2)})
    wait_until(lambda: _ready(c) == {"2"}, what="version 2 to take over")
    assert _answer(c) == 2.0
    assert "model 'm' version 2: still changing" in srv.log

    delete_prefix(s3c, bucket, "repo/m/2/")
    wait_until(lambda: _ready(c) == {"1"} and not version2.exists(),
               what="version 1 to come back once version 2 is deleted")
    assert _answer(c) == 1.0

    put(s3c, bucket, _add_model("late", 3))
    wait_until(lambda: states(c, "late") == {"3": "READY"}, what="a model uploaded later")
    assert _answer(c, "late") == 3.0
    delete_prefix(s3c, bucket, "repo/late/")
    wait_until(lambda: not index_of(c, "late"), what="the deleted model to leave the index")
    expect_error("NOT_FOUND", infer_fp32, c, "late", _x())
    assert c.is_server_ready()
    _no_secrets(srv.log)


def test_ready_marker(s3, tmp_path: Path, server_factory) -> None:
    """With --model-repository-ready-marker a complete-looking version still waits for the marker."""
    s3c, bucket = s3
    put(s3c, bucket, {**_add_model("m", 1), "repo/m/1/READY": ""})
    poll = scaled(0.3)
    srv = server_factory([f"s3://{bucket}/repo"], "--model-control-mode", "poll", "--repository-poll-secs",
                         str(poll), "--model-repository-ready-marker", "READY")
    c = client(srv)
    assert states(c, "m") == {"1": "READY"}
    put(s3c, bucket, {"repo/m/2/model.onnx": add_model_bytes(2)})
    srv.wait_for_log(re.compile("model 'm' version 2: waits for its ready marker 'READY'"), 10)
    time.sleep(4 * poll)  # the listing has been still for several polls: without the marker it would be taken
    assert _ready(c) == {"1"} and _answer(c) == 1.0
    put(s3c, bucket, {"repo/m/2/READY": ""})
    wait_until(lambda: _ready(c) == {"2"}, what="version 2 once its marker is uploaded")
    assert _answer(c) == 2.0


def test_explicit_mode_loads_by_name(s3, server_factory) -> None:
    """The index lists the bucket's models (a model uploaded after startup too); a load takes the
    model as it is in the bucket now; a model that is not there fails as Triton's does."""
    s3c, bucket = s3
    put(s3c, bucket, _add_model("m", 1))
    srv = server_factory([f"s3://{bucket}/repo"], "--model-control-mode", "explicit")
    c = client(srv)
    assert index_of(c, "m") == [("", "", "")]
    put(s3c, bucket, _add_model("other", 5))
    assert index_of(c, "other") == [("", "", "")]
    c.load_model("m")
    assert states(c, "m") == {"1": "READY"} and _answer(c) == 1.0
    put(s3c, bucket, {"repo/m/2/model.onnx": add_model_bytes(2)})
    time.sleep(scaled(0.3))
    assert _answer(c) == 1.0  # nothing happens until the next load
    c.load_model("m")
    assert _ready(c) == {"2"} and _answer(c) == 2.0
    c.unload_model("m")
    assert not _ready(c) and "unloaded" in [reason for _, _, reason in index_of(c, "m")]
    error = expect_error("INVALID_ARGUMENT", c.load_model, "missing")
    assert "failed to load 'missing', failed to poll from model repository" in error.message()
    _no_secrets(srv.log)


def test_hostile_keys_are_refused(s3, tmp_path: Path, server_factory) -> None:
    """Keys that would leave the cache are refused and logged; their version is not taken; the
    good model next to them serves; no file appears outside the mirror."""
    s3c, bucket = s3
    marker = f"nereid-escape-{uuid.uuid4().hex[:8]}"
    escape_abs = Path("/tmp") / marker
    hostile = [  # one per unit, so that each is stopped by the key rules alone
        f"repo/../{marker}-1",
        f"repo/evil/2/../../../../{marker}-2",  # lands in tmp_path if joined naively
        f"repo/evil/3/../../../../../../../../../../../../tmp/{marker}-3",  # in /tmp
        f"repo/{escape_abs}",  # "repo//tmp/...": an absolute path after the prefix
        f"repo/evil\\..\\..\\{marker}-4/1/x",
        "repo/evil/1/" + "a" * 300,
        f"repo/evil2/warmup/../../../../{marker}-5",  # a model-level file
    ]
    put(s3c, bucket, {"repo/good/config.pbtxt": identity_config("good", [("INPUT0", "FP32", [4])]),
                      "repo/good/1/README": "x",
                      "repo/evil/config.pbtxt": identity_config("evil", [("INPUT0", "FP32", [4])]),
                      "repo/evil/1/README": "x", "repo/evil2/config.pbtxt": "x",
                      **dict.fromkeys(hostile, "pwned")})
    cache = tmp_path / "a" / "b" / "cache"
    srv = server_factory([f"s3://{bucket}/repo"], "--model-repository-cache", str(cache),
                         "--strict-readiness", "false")
    written = [p for p in tmp_path.rglob("*") if marker in p.name or "aaaa" in p.name]
    assert written == []
    assert not escape_abs.exists() and not (ROOT / f"{marker}-1").exists()
    assert not list(Path("/tmp").glob(f"{marker}*"))
    c = client(srv)
    assert states(c, "good") == {"1": "READY"}
    assert "READY" not in states(c, "evil").values()
    for key in hostile:
        assert f"refusing object key {ascii(key)[:160]}" in srv.log, key
    for unit in ("model 'evil' version 1", "model 'evil' version 2", "model 'evil' version 3", "model 'evil2' files"):
        assert f"{unit}: not taken, it holds a refused object key" in srv.log
    assert sorted(str(p.relative_to(_mirror(cache))) for p in _mirror(cache).rglob("*") if p.is_file()) == [
        "evil/config.pbtxt", "good/1/README", "good/config.pbtxt"]


def test_a_download_gets_the_object_as_listed(s3, moto: MotoS3) -> None:
    """S3Store asks for the listed ETag: an object replaced after the listing fails to download
    (the mirror then leaves the unit for the next poll) instead of mixing two uploads."""
    s3c, bucket = s3
    put(s3c, bucket, {"repo/m/1/model.onnx": "first"})
    store = open_store(parse_url(f"s3://{bucket}/repo"))
    (listed,) = store.list_objects("repo/")
    assert (listed.key, listed.size) == ("repo/m/1/model.onnx", 5)
    out = io.BytesIO()
    assert store.download(listed, out) == 5 and out.getvalue() == b"first"
    put(s3c, bucket, {"repo/m/1/model.onnx": "second"})
    with pytest.raises(StoreError, match="changed since it was listed"):
        store.download(listed, io.BytesIO())
    assert store.list_folders("repo/") == ["m"]


def _serve_once(args: list[str], env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run `nereid serve` (after `prelude`, Python run first) and return what it did; it must exit."""
    code = f"{prelude}\nimport sys\nfrom server.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=scaled(60))


def test_startup_errors_are_one_line(s3, moto: MotoS3, tmp_path: Path) -> None:
    s3c, bucket = s3
    env = dict(os.environ)
    base = ["serve", "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"]

    missing = _serve_once([*base, "--model-repository", f"s3://no-such-bucket-{bucket}/repo"], env)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].startswith("nereid: listing s3://no-such-bucket-")
    assert "NoSuchBucket" in missing.stderr
    _no_secrets(missing.stderr + missing.stdout)

    no_boto = _serve_once([*base, "--model-repository", f"s3://{bucket}/repo"], env,
                          prelude="import sys; sys.modules['boto3'] = None")
    assert no_boto.returncode != 0
    assert no_boto.stderr.strip() == \
        "nereid: s3:// model repositories need the boto3 package: pip install nereid[s3]"

    creds = _serve_once([*base, "--model-repository", f"s3://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:1/b/p"], env)
    assert creds.returncode != 0 and "credentials in an s3:// URL are not accepted" in creds.stderr
    _no_secrets(creds.stderr)

    twice = _serve_once([*base, "--model-repository", f"s3://{bucket}/repo", "--model-repository",
                         f"s3://{bucket}/repo/"], env)
    assert twice.stderr.strip() == f"nereid: model repository s3://{bucket}/repo/ is given twice"


def test_two_servers_cannot_share_a_cache_folder(s3, tmp_path: Path, server_factory) -> None:
    s3c, bucket = s3
    put(s3c, bucket, {"repo/x/config.pbtxt": identity_config("x", [("INPUT0", "FP32", [4])]), "repo/x/1/a": "a"})
    cache = ["--model-repository-cache", str(tmp_path / "cache")]
    first = server_factory([f"s3://{bucket}/repo"], *cache)
    second = _serve_once(["serve", "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
                          "--model-repository",
                          f"s3://{bucket}/repo", *cache], dict(os.environ))
    assert second.returncode != 0
    assert "is in use by another Nereid server" in second.stderr.strip().splitlines()[-1]
    assert states(client(first), "x") == {"1": "READY"}  # the first server's mirror is untouched
