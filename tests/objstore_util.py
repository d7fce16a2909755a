"""Local object-store servers for the tests: moto's S3 server and gcp-storage-emulator, on 127.0.0.1.

Each runs as its own process on a free port and is stopped by the fixture that
started it. The S3 credentials are fake (moto accepts any) and distinctive, so a
test can check that they never reach the server's log.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from util import ROOT, scaled

BIN = Path(sys.executable).parent
ACCESS_KEY = "AKIANEREIDTESTKEY001"
SECRET_KEY = "nereid-secret-" + uuid.uuid4().hex  # must never appear in a server log
SESSION_TOKEN = "nereid-token-" + uuid.uuid4().hex  # nor this
S3_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
    # Nothing from the developer's own AWS setup may leak into a test.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class _Process:
    """A helper server process whose output is collected (for failure messages)."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.proc.args[:3]} did not log {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


class MotoS3(_Process):
    """moto's S3 server (`moto[server]`) on 127.0.0.1, a port the kernel picks."""

    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
        self.port = int(self.wait_for(r"Running on http://127\.0\.0\.1:(\d+)").group(1))
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        ).client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        """A new empty bucket."""
        name = "nereid-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server that cannot report the port it bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeGCS(_Process):
    """gcp-storage-emulator (in memory) on 127.0.0.1; clients reach it via STORAGE_EMULATOR_HOST."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__([str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                          "--port", str(self.port), "--in-memory"])
        self.wait_for(r"All services started")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def bucket(self) -> Any:
        """A new empty bucket (a google.cloud.storage Bucket). STORAGE_EMULATOR_HOST must point here."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        assert os.environ.get("STORAGE_EMULATOR_HOST") == self.endpoint
        gcs = storage.Client(project="nereid-test", credentials=AnonymousCredentials())
        return gcs.create_bucket("nereid-" + uuid.uuid4().hex[:12])


def put(s3: Any, bucket: str, files: dict[str, bytes | str]) -> None:
    """Upload objects: {key: content}."""
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data.encode() if isinstance(data, str) else data)


def delete_prefix(s3: Any, bucket: str, prefix: str) -> None:
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", ()):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
