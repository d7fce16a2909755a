"""TLS server credentials from tritonserver's flags, checked before the server starts.

grpcio reports a bad certificate or key only as "Failed to bind to address" plus C-level
log lines, so every file is read and checked here first (with the standard `ssl` module,
no extra dependency) and a problem becomes one line naming the flag and the file.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import grpc

from server.settings import Settings


class TLSConfigError(ValueError):
    """The TLS flags or files cannot make a server; the message is one line for the operator."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None when TLS is off. Raises TLSConfigError."""
    if not settings.grpc_use_ssl:
        return None
    cert_path = _required(settings.grpc_server_cert, "--grpc-server-cert")
    key_path = _required(settings.grpc_server_key, "--grpc-server-key")
    cert = _read("--grpc-server-cert", cert_path)
    key = _read("--grpc-server-key", key_path)
    _check_certificates("--grpc-server-cert", cert_path, cert)
    _check_key_pair(cert_path, key_path)
    root: bytes | None = None
    if settings.grpc_use_ssl_mutual:
        root_path = _required(settings.grpc_root_cert, "--grpc-root-cert")
        root = _read("--grpc-root-cert", root_path)
        _check_certificates("--grpc-root-cert", root_path, root)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=root, require_client_auth=settings.grpc_use_ssl_mutual
    )


def describe(settings: Settings) -> str:
    """A line for the startup log: which TLS mode serves (never any key material)."""
    if not settings.grpc_use_ssl:
        return "plaintext (no TLS)"
    if settings.grpc_use_ssl_mutual:
        return "TLS, client certificates required (mutual)"
    return "TLS"


def ignored_files(settings: Settings) -> list[str]:
    """Certificate flags given while TLS is off (tritonserver ignores them too; we say so)."""
    if settings.grpc_use_ssl:
        return []
    flags = (("--grpc-server-cert", settings.grpc_server_cert), ("--grpc-server-key", settings.grpc_server_key),
             ("--grpc-root-cert", settings.grpc_root_cert))
    return [flag for flag, path in flags if path is not None]


def _required(path: Path | None, flag: str) -> Path:
    if path is None:
        mutual_only = flag == "--grpc-root-cert"
        need = "--grpc-use-ssl-mutual" if mutual_only else "TLS (--grpc-use-ssl or --grpc-use-ssl-mutual)"
        raise TLSConfigError(f"{need} needs {flag}=<file>")
    return path


def _read(flag: str, path: Path) -> bytes:
    try:
        # Never block on a FIFO or read a device: only a regular file is opened.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise TLSConfigError(f"{flag} '{path}' is not a regular file")
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {flag} '{path}': {exc.strerror or exc}") from None
    if not data.strip():
        raise TLSConfigError(f"{flag} '{path}' is empty")
    return data


def _check_certificates(flag: str, path: Path, data: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise TLSConfigError(f"{flag} '{path}' holds no valid PEM certificate") from None


def _check_key_pair(cert_path: Path, key_path: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from prompting on a terminal for an encrypted key.
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"--grpc-server-key '{key_path}' is not the private key of --grpc-server-cert '{cert_path}'"
            ) from None
        raise TLSConfigError(
            f"--grpc-server-key '{key_path}' holds no unencrypted PEM private key"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read --grpc-server-key '{key_path}': {exc.strerror or exc}") from None
