"""S3 (and S3-compatible servers) through boto3: list, list folders, download as listed.

A download asks for the listed ETag (`If-Match`), so an object replaced between
the listing and the download fails instead of mixing two uploads in one
version; the mirror then takes it at a later poll. botocore's own loggers stay
at WARNING whatever --log-verbose says: at DEBUG they print request headers,
session tokens included.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, BinaryIO

from server.repository.objkeys import ObjectInfo, shown
from server.repository.objstore import RemoteURL, StoreError

CHUNK = 1 << 20
QUIET_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")


def quiet_loggers(names: tuple[str, ...]) -> None:
    """Client libraries log credentials-bearing requests at DEBUG: keep them at WARNING."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


class S3Store:
    def __init__(self, url: RemoteURL) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        quiet_loggers(QUIET_LOGGERS)
        self.url = url
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError, OSError)
        config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path"} if url.endpoint else None)
        try:
            self._client: Any = boto3.session.Session().client(
                "s3", endpoint_url=url.endpoint or None, config=config)
        except self._errors as exc:
            raise StoreError(f"cannot set up the S3 client for {url.display}: {exc}") from None

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(item["Key"], int(item["Size"]), item.get("ETag", ""))
        except self._errors as exc:
            raise StoreError(f"listing {self.url.at(prefix)} failed: {exc}") from None

    def list_folders(self, prefix: str) -> list[str]:
        names = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.url.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for item in page.get("CommonPrefixes", ()):
                    names.append(item["Prefix"][len(prefix):].rstrip("/"))
        except self._errors as exc:
            raise StoreError(f"listing {self.url.at(prefix)} failed: {exc}") from None
        return names

    def download(self, obj: ObjectInfo, out: BinaryIO) -> int:
        where = self.url.at(shown(obj.key))
        try:
            extra = {"IfMatch": obj.token} if obj.token else {}
            body = self._client.get_object(Bucket=self.url.bucket, Key=obj.key, **extra)["Body"]
            written = 0
            try:
                while chunk := body.read(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            finally:
                body.close()
            return written
        except self._errors as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412"):
                raise StoreError(f"{where} changed since it was listed") from None
            raise StoreError(f"downloading {where} failed: {exc}") from None
