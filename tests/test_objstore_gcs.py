"""Model repositories on Google Cloud Storage: real Nereid servers reading the GCS JSON API from
gcp-storage-emulator on 127.0.0.1, through the same mirror as s3:// (test_objstore.py has the
full set of rules; here: the gs:// store itself, in none and poll mode)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from lifecycle_util import add_config, add_model_bytes, infer_fp32, states, wait_until
from objstore_util import FakeGCS
from util import client, require, scaled

from server.repository.objstore import StoreError, open_store, parse_url

require("onnxruntime")


@pytest.fixture(scope="module")
def fake_gcs() -> Iterator[FakeGCS]:
    server = FakeGCS()
    yield server
    server.stop()


@pytest.fixture
def bucket(fake_gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.endpoint)
    return fake_gcs.bucket()


def _put(bucket, files: dict[str, bytes | str]) -> None:
    for key, data in files.items():
        bucket.blob(key).upload_from_string(data)


def _answer(c) -> float:
    return float(infer_fp32(c, "m", np.arange(4, dtype=np.float32)).as_numpy("OUTPUT0")[0])


def test_none_mode_serves_a_gs_repository(bucket, server_factory) -> None:
    _put(bucket, {"models/m/config.pbtxt": add_config("m"), "models/m/1/model.onnx": add_model_bytes(1)})
    srv = server_factory([f"gs://{bucket.name}/models"])
    c = client(srv)
    assert states(c, "m") == {"1": "READY"} and _answer(c) == 1.0
    assert f"model repository gs://{bucket.name}/models/: 1 model folder(s)" in srv.log


def test_poll_mode_follows_a_gs_bucket(bucket, server_factory) -> None:
    _put(bucket, {"models/m/config.pbtxt": add_config("m"), "models/m/1/model.onnx": add_model_bytes(1)})
    srv = server_factory([f"gs://{bucket.name}/models"], "--model-control-mode", "poll",
                         "--repository-poll-secs", str(scaled(0.3)))
    c = client(srv)
    assert _answer(c) == 1.0
    _put(bucket, {"models/m/2/model.onnx": add_model_bytes(2)})
    wait_until(lambda: states(c, "m").get("2") == "READY", what="version 2 from the bucket")
    assert _answer(c) == 2.0
    _put(bucket, {"models/m/2/model.onnx": add_model_bytes(7)})  # replaced in place: a new generation
    wait_until(lambda: _answer(c) == 7.0, what="the replaced version 2")
    assert "model 'm' version 2: replaced" in srv.log


def test_a_download_gets_the_object_as_listed(bucket) -> None:
    """GCSStore checks the bytes against the listed checksum: an object replaced after the
    listing fails to download. (The emulator ignores the generation a download names, so this is
    the check that catches it here; real GCS already refuses the stale generation.)"""
    _put(bucket, {"models/m/1/model.onnx": "first"})
    store = open_store(parse_url(f"gs://{bucket.name}/models"))
    (listed,) = store.list_objects("models/")
    assert (listed.key, listed.size) == ("models/m/1/model.onnx", 5) and listed.checksum.startswith("md5:")
    out = io.BytesIO()
    assert store.download(listed, out) == 5 and out.getvalue() == b"first"
    _put(bucket, {"models/m/1/model.onnx": "other"})
    with pytest.raises(StoreError, match="changed since it was listed"):
        store.download(listed, io.BytesIO())
    assert store.list_folders("models/") == ["m"]
