"""HTTP/REST with the other clients Triton users have: tritonclient.http.aio (aiohttp) and plain
curl (docs/HTTP.md). curl is installed by scripts/setup; a missing curl fails the test."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import numpy as np
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, scaled


def test_aio_client_infer_metadata_and_errors(identity_server: ServerProcess) -> None:
    async def run() -> None:
        c = aioclient.InferenceServerClient(identity_server.http_url, conn_timeout=scaled(30))
        try:
            assert await c.is_server_live() and await c.is_model_ready("id_pair")
            meta = await c.get_model_metadata("id_pair")
            assert meta["name"] == "id_pair" and [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]

            async def one(i: int, binary: bool) -> None:
                a = np.full((1, 4), i, np.float32)
                b = np.arange(4, dtype=np.int32).reshape(1, 4) + i
                in0 = aioclient.InferInput("INPUT0", [1, 4], "FP32")
                in1 = aioclient.InferInput("INPUT1", [1, 4], "INT32")
                in0.set_data_from_numpy(a, binary_data=binary)
                in1.set_data_from_numpy(b, binary_data=binary)
                outs = [aioclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
                result = await c.infer("id_pair", [in0, in1], outputs=outs, request_id=f"aio-{i}")
                assert result.get_response()["id"] == f"aio-{i}"
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), b)

            await asyncio.gather(*(one(i, i % 2 == 0) for i in range(16)))
            try:
                await c.get_model_metadata("no_such_model")
                raise AssertionError("an unknown model answered")
            except InferenceServerException as exc:
                assert exc.status() == "404" and "no_such_model" in exc.message()
        finally:
            await c.close()

    asyncio.run(run())


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    assert curl, "curl is not installed (scripts/setup installs it with apt-get)"
    return subprocess.run([curl, "-sS", "--max-time", str(scaled(30)), *args], capture_output=True, text=True,
                          check=True, timeout=scaled(60))


def test_curl_infer_health_and_error(identity_server: ServerProcess) -> None:
    base = f"http://{identity_server.http_url}"
    body = {"id": "curl-1",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [[1.5, 2, 3, 4]]},
                       {"name": "INPUT1", "datatype": "INT32", "shape": [1, 4], "data": [5, 6, 7, 8]}]}
    out = _curl("-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body),
                f"{base}/v2/models/id_pair/infer").stdout
    answer = json.loads(out)
    assert answer["id"] == "curl-1" and answer["model_name"] == "id_pair"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["OUTPUT0"] == {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1.5, 2, 3, 4]}
    assert outputs["OUTPUT1"]["data"] == [5, 6, 7, 8]
    assert _curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/v2/health/ready").stdout == "200"
    bad = _curl("-w", "\n%{http_code}", "-X", "POST", "-d", "{not json", f"{base}/v2/models/id_pair/infer").stdout
    text, code = bad.rsplit("\n", 1)
    assert code == "400" and "failed to parse the request JSON buffer" in json.loads(text)["error"]
