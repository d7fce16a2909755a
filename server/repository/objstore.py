"""The seam to object storage: parse an `s3://` or `gs://` repository URL and open its store.

A store does three things, all the mirror needs (mirror.py): list the objects
under a prefix, list the "folders" right under a prefix (for RepositoryIndex),
and download one listed object, exactly as listed, into an open file. S3 is
objstore_s3.py (boto3, the `s3` extra), Google Cloud Storage objstore_gcs.py
(google-cloud-storage, the `gs` extra); each imports its client library only
when a repository of its kind is opened, so the server runs without either.

Credentials come from each library's standard sources (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, instance roles;
GOOGLE_APPLICATION_CREDENTIALS, workload identity); they never pass through
Nereid's settings and are never logged. Endpoints of S3-compatible servers come
from the URL, as tritonserver spells it (`s3://host:port/bucket/prefix`, HTTP;
`s3://https://host:port/bucket/prefix`), or from AWS_ENDPOINT_URL;
STORAGE_EMULATOR_HOST points the GCS client at an emulator.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from server.repository.objkeys import ObjectInfo, key_problem, shown

SCHEMES = ("s3", "gs")
# scheme -> (module, the package that brings it, Nereid's extra)
CLIENTS = {"s3": ("boto3", "boto3", "s3"), "gs": ("google.cloud.storage", "google-cloud-storage", "gs")}
_HOST_PORT = re.compile(r"[A-Za-z0-9.-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}")


class StoreError(Exception):
    """Listing or downloading failed. The message names the operation and the store's answer,
    never a credential."""


@dataclass(frozen=True)
class RemoteURL:
    """`s3://[http(s)://host:port/]bucket[/prefix]` or `gs://bucket[/prefix]`, parsed."""

    scheme: str
    bucket: str
    prefix: str  # "" or ending in "/"
    endpoint: str = ""  # http(s)://host:port for an S3-compatible server named in the URL

    @property
    def display(self) -> str:
        """The URL for logs (it holds no credentials: the parser refuses them)."""
        return self.at(self.prefix)

    def at(self, key: str) -> str:
        """The URL of `key` in this bucket, for messages (escape a key from the bucket first)."""
        where = f"{self.endpoint}/" if self.endpoint else ""
        return f"{self.scheme}://{where}{self.bucket}/{key}"


def is_remote(text: str) -> bool:
    return text.partition("://")[0].lower() in SCHEMES and "://" in text


def parse_url(text: str) -> RemoteURL:
    """Parse a repository URL; ValueError says what is wrong without repeating a credential."""
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"model repository URL scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    endpoint = ""
    if scheme == "s3":
        tls = rest.lower().startswith("https://")
        if tls or rest.lower().startswith("http://"):
            rest = rest.partition("://")[2]
        host, sep, after = rest.partition("/")
        if "@" in host:
            raise ValueError("credentials in an s3:// URL are not accepted; use AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or a profile or role)")
        if _HOST_PORT.fullmatch(host):
            endpoint, rest = f"{'https' if tls else 'http'}://{host}", after
        elif tls:
            raise ValueError("s3://https:// must be followed by host:port, then the bucket")
    bucket, _, prefix = rest.partition("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise ValueError(f"model repository URL needs a bucket: {scheme}://[host:port/]bucket[/prefix]"
                         if scheme == "s3" else f"model repository URL needs a bucket: {scheme}://bucket[/prefix]")
    prefix = prefix.strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise ValueError(f"model repository prefix '{prefix}' has an empty, '.' or '..' component")
    return RemoteURL(scheme, bucket, prefix + "/" if prefix else "", endpoint)


class ObjectStore(Protocol):
    url: RemoteURL

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix` (all pages)."""
        ...

    def list_folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under `prefix` (keys up to the next "/")."""
        ...

    def download(self, obj: ObjectInfo, out: BinaryIO) -> int:
        """Write the object into `out` as it was listed; the bytes written. StoreError if the
        object changed since (S3 If-Match on the ETag, GCS the generation and checksum)."""
        ...


def missing_client(scheme: str) -> str:
    """The one-line error when the client library of `scheme` is not installed ("" if it is)."""
    module, package, extra = CLIENTS[scheme]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        found = False
    if not found:
        return f"{scheme}:// model repositories need the {package} package: pip install nereid[{extra}]"
    return ""


def open_store(url: RemoteURL) -> ObjectStore:
    """The store for `url`; StoreError when its client is missing or cannot be set up."""
    problem = missing_client(url.scheme)
    if problem:
        raise StoreError(problem)
    try:
        if url.scheme == "s3":
            from server.repository.objstore_s3 import S3Store

            return S3Store(url)
        from server.repository.objstore_gcs import GCSStore

        return GCSStore(url)
    except ImportError as exc:  # installed but broken (a missing dependency of the client)
        _, package, extra = CLIENTS[url.scheme]
        raise StoreError(f"{url.scheme}:// model repositories need the {package} package, which cannot be "
                         f"imported ({exc}): pip install nereid[{extra}]") from None


def check_urls(urls: tuple[str, ...], marker: str = "") -> None:
    """Command-line checks before anything starts: each URL parses, is given once, and its client
    library is installed; the ready marker is a plain relative name. ValueError says which."""
    seen: set[str] = set()
    for text in urls:
        url = parse_url(text)
        if url.display in seen:
            raise ValueError(f"model repository {url.display} is given twice")
        seen.add(url.display)
        problem = missing_client(url.scheme)
        if problem:
            raise ValueError(problem)
    if marker and key_problem(marker):
        raise ValueError(f"--model-repository-ready-marker {shown(marker)} is not usable: {key_problem(marker)}")
