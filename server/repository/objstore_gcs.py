"""Google Cloud Storage through google-cloud-storage: list, list folders, download as listed.

A download names the listed generation, and the bytes are checked against the
listed MD5 (or CRC32C for composite objects), so an object replaced between the
listing and the download is never mixed into a version. STORAGE_EMULATOR_HOST
points the client at an emulator (anonymous credentials); otherwise the
client's Application Default Credentials are used.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from server.repository.objkeys import ObjectInfo, shown
from server.repository.objstore import RemoteURL, StoreError
from server.repository.objstore_s3 import quiet_loggers

QUIET_LOGGERS = ("google", "google.auth", "google.cloud", "google.api_core", "urllib3", "requests")
TIMEOUT_S = 60.0
RETRY_DEADLINE_S = 30.0


class _Hashing:
    """A file wrapper that hashes what passes through it, for the checksum check."""

    def __init__(self, out: BinaryIO, algorithm: str) -> None:
        self.out, self.written = out, 0
        if algorithm == "crc32c":
            import google_crc32c

            self.hash: Any = google_crc32c.Checksum()
        else:
            self.hash = hashlib.md5(usedforsecurity=False)

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.written += len(data)
        return self.out.write(data)

    def digest(self) -> str:
        return base64.b64encode(self.hash.digest()).decode("ascii")


class GCSStore:
    def __init__(self, url: RemoteURL) -> None:
        from google.api_core import exceptions as api_errors
        from google.api_core.retry import Retry
        from google.auth import exceptions as auth_errors
        from google.cloud import storage
        from requests import RequestException

        quiet_loggers(QUIET_LOGGERS)
        self.url = url
        self._errors: tuple[type[Exception], ...] = (
            api_errors.GoogleAPIError, auth_errors.GoogleAuthError, RequestException, OSError, ValueError)
        self._retry = Retry(timeout=RETRY_DEADLINE_S)
        try:
            self._client: Any = storage.Client()
        except self._errors as exc:
            raise StoreError(f"cannot set up the Google Cloud Storage client for {url.display}: {exc}") from None

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for blob in self._client.list_blobs(self.url.bucket, prefix=prefix, timeout=TIMEOUT_S, retry=self._retry):
                checksum = f"md5:{blob.md5_hash}" if blob.md5_hash else \
                    f"crc32c:{blob.crc32c}" if blob.crc32c else ""
                yield ObjectInfo(blob.name, int(blob.size or 0), str(blob.generation or ""), checksum)
        except self._errors as exc:
            raise StoreError(f"listing {self.url.at(prefix)} failed: {exc}") from None

    def list_folders(self, prefix: str) -> list[str]:
        try:
            blobs = self._client.list_blobs(self.url.bucket, prefix=prefix, delimiter="/", timeout=TIMEOUT_S,
                                            retry=self._retry)
            for _ in blobs:  # the prefixes are known once the pages have been read
                pass
            return [p[len(prefix):].rstrip("/") for p in sorted(blobs.prefixes)]
        except self._errors as exc:
            raise StoreError(f"listing {self.url.at(prefix)} failed: {exc}") from None

    def download(self, obj: ObjectInfo, out: BinaryIO) -> int:
        where = self.url.at(shown(obj.key))
        algorithm, _, expected = obj.checksum.partition(":")
        sink = _Hashing(out, algorithm or "md5")
        try:
            generation = int(obj.token) if obj.token else None
            blob = self._client.bucket(self.url.bucket).blob(obj.key, generation=generation)
            blob.download_to_file(sink, timeout=TIMEOUT_S, retry=self._retry, checksum=None)
        except self._errors as exc:
            if getattr(exc, "code", None) in (404, 412):
                raise StoreError(f"{where} changed since it was listed") from None
            raise StoreError(f"downloading {where} failed: {exc}") from None
        if expected and sink.digest() != expected:
            raise StoreError(f"{where} changed since it was listed (its {algorithm} does not match the listing)")
        return sink.written
