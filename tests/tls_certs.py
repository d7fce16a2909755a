"""Certificates made at test time (the `cryptography` package): a CA, a server certificate
for 127.0.0.1/localhost signed by it, a client certificate, and the same from a second,
unrelated CA. Nothing is checked in; every run makes fresh keys."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files: one CA with a server and a client certificate signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(key, common_name: str, issuer_key=None, issuer=None, ca: bool = False, server: bool = False,
                 client: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(folder: Path, name: str) -> Pki:
    """A CA called `name` with a server and a client certificate, written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _certificate(ca_key, f"{name} test CA", ca=True)
    server_key = _key()
    server = _certificate(server_key, "localhost", ca_key, ca, server=True)
    client_key = _key()
    client = _certificate(client_key, f"{name} client", ca_key, ca, client=True)
    return Pki(
        ca=_write(folder / f"{name}-ca.pem", _cert_pem(ca)),
        server_cert=_write(folder / f"{name}-server.pem", _cert_pem(server)),
        server_key=_write(folder / f"{name}-server.key", _key_pem(server_key)),
        client_cert=_write(folder / f"{name}-client.pem", _cert_pem(client)),
        client_key=_write(folder / f"{name}-client.key", _key_pem(client_key)),
    )
