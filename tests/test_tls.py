"""TLS and mutual TLS with tritonserver's flags, against real servers and certificates made
at test time: the right client connects and infers; plaintext clients and (mutual) clients
without a certificate from the right CA are refused. Bad TLS files stop startup with one line and exit code 1."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tls_certs import Pki, make_pki
from tritonclient.utils import InferenceServerException
from util import PYTHON, ROOT, ServerProcess, identity_config, write_model

TIME_FACTOR = float(os.environ.get("NEREID_TEST_TIME_FACTOR", "1"))
CONNECT_TIMEOUT = 5.0 * TIME_FACTOR


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls_repo")
    write_model(path, "echo", identity_config("echo", [("INPUT0", "FP32", [4])]))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "good")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """An unrelated CA with its own server and client certificates."""
    return make_pki(tmp_path_factory.mktemp("pki_other"), "other")


def _tls_args(pki: Pki) -> list[str]:
    return ["--grpc-use-ssl=true", f"--grpc-server-cert={pki.server_cert}", f"--grpc-server-key={pki.server_key}"]


@pytest.fixture(scope="module")
def tls_server(repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    server = ServerProcess([repo], _tls_args(pki))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    # No --grpc-use-ssl: --grpc-use-ssl-mutual=true turns TLS on by itself, as in tritonserver.
    server = ServerProcess([repo], [
        "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={pki.server_cert}",
        f"--grpc-server-key={pki.server_key}", f"--grpc-root-cert={pki.ca}",
    ])
    yield server
    server.stop()


def _infer(client: grpcclient.InferenceServerClient) -> None:
    data = np.arange(4, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("echo", [tensor], client_timeout=CONNECT_TIMEOUT)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def _tls_client(server: ServerProcess, ca: Path, cert: Pki | None = None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=str(ca),
        private_key=str(cert.client_key) if cert else None,
        certificate_chain=str(cert.client_cert) if cert else None,
    )


def _expect_refused(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live(client_timeout=CONNECT_TIMEOUT)
    assert info.value.status() == "StatusCode.UNAVAILABLE", info.value


def test_tls_client_connects_and_infers(tls_server: ServerProcess, pki: Pki) -> None:
    client = _tls_client(tls_server, pki.ca)
    assert client.is_server_live(client_timeout=CONNECT_TIMEOUT)
    _infer(client)
    assert "gRPC transport: TLS" in tls_server.log


def test_tls_server_refuses_plaintext_client(tls_server: ServerProcess) -> None:
    _expect_refused(grpcclient.InferenceServerClient(tls_server.url))


def test_mutual_tls_client_with_certificate_connects(mtls_server: ServerProcess, pki: Pki) -> None:
    client = _tls_client(mtls_server, pki.ca, pki)
    assert client.is_server_live(client_timeout=CONNECT_TIMEOUT)
    _infer(client)
    assert "client certificates required" in mtls_server.log


def test_mutual_tls_refuses_client_without_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    _expect_refused(_tls_client(mtls_server, pki.ca))


def test_mutual_tls_refuses_certificate_from_another_ca(mtls_server: ServerProcess, pki: Pki, other_pki: Pki) -> None:
    _expect_refused(_tls_client(mtls_server, pki.ca, other_pki))


def test_mutual_tls_refuses_plaintext_client(mtls_server: ServerProcess) -> None:
    _expect_refused(grpcclient.InferenceServerClient(mtls_server.url))


# ---------------------------------------------------------------------------
# Startup errors: one line on stderr, exit code 1, no traceback.


def _start_expecting_failure(repo: Path, *args: str) -> str:
    cmd = [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo),
           "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60 * TIME_FACTOR,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nereid: "), proc.stderr
    return lines[0]


def test_missing_certificate_file_is_one_line(repo: Path, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    line = _start_expecting_failure(repo, "--grpc-use-ssl=true", f"--grpc-server-cert={missing}",
                                    f"--grpc-server-key={pki.server_key}")
    assert line == f"nereid: cannot read --grpc-server-cert '{missing}': No such file or directory"


def test_unreadable_key_file_is_one_line(repo: Path, pki: Pki) -> None:
    # A path through a regular file cannot be read even by root (tests may run as root,
    # where a mode-000 file would still be readable).
    key = pki.server_key / "server.key"
    line = _start_expecting_failure(repo, "--grpc-use-ssl=true", f"--grpc-server-cert={pki.server_cert}",
                                    f"--grpc-server-key={key}")
    assert line == f"nereid: cannot read --grpc-server-key '{key}': Not a directory"


@pytest.mark.parametrize("case", ["no_cert_flag", "no_root_for_mutual", "key_of_other_cert", "not_pem", "directory"])
def test_bad_tls_configuration_is_one_line(repo: Path, pki: Pki, other_pki: Pki, tmp_path: Path, case: str) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    args = {
        "no_cert_flag": (["--grpc-use-ssl=1", f"--grpc-server-key={pki.server_key}"],
                         "nereid: TLS (--grpc-use-ssl or --grpc-use-ssl-mutual) needs --grpc-server-cert=<file>"),
        "no_root_for_mutual": (["--grpc-use-ssl-mutual=on", f"--grpc-server-cert={pki.server_cert}",
                                f"--grpc-server-key={pki.server_key}"],
                               "nereid: --grpc-use-ssl-mutual needs --grpc-root-cert=<file>"),
        "key_of_other_cert": (_tls_args(pki)[:2] + [f"--grpc-server-key={other_pki.server_key}"],
                              f"nereid: --grpc-server-key '{other_pki.server_key}' is not the private key of "
                              f"--grpc-server-cert '{pki.server_cert}'"),
        "not_pem": (["--grpc-use-ssl=true", f"--grpc-server-cert={junk}", f"--grpc-server-key={pki.server_key}"],
                    f"nereid: --grpc-server-cert '{junk}' holds no valid PEM certificate"),
        "directory": (["--grpc-use-ssl=true", f"--grpc-server-cert={pki.server_cert}",
                       f"--grpc-server-key={pki.server_key}", "--grpc-use-ssl-mutual=true",
                       f"--grpc-root-cert={tmp_path}"],
                      f"nereid: --grpc-root-cert '{tmp_path}' is not a regular file"),
    }
    flags, expected = args[case]
    assert _start_expecting_failure(repo, *flags) == expected


def test_ssl_flags_need_a_value(repo: Path) -> None:
    """As in tritonserver, --grpc-use-ssl takes a value; a bare flag is a usage error."""
    cmd = [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo), "--grpc-use-ssl",
           "--grpc-port", "0", "--http-port", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60 * TIME_FACTOR)
    assert proc.returncode == 2 and "--grpc-use-ssl" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "use_ssl", "mutual"), [
    ([], False, False),
    (["--grpc-use-ssl=true"], True, False),
    (["--grpc-use-ssl=OFF"], False, False),
    # As in tritonserver, --grpc-use-ssl-mutual given at all turns TLS on ...
    (["--grpc-use-ssl-mutual=false"], True, False),
    (["--grpc-use-ssl-mutual=1"], True, True),
    # ... and it wins over --grpc-use-ssl in either order (Triton: "will preempt").
    (["--grpc-use-ssl-mutual=true", "--grpc-use-ssl=false"], True, True),
    (["--grpc-use-ssl=false", "--grpc-use-ssl-mutual=true"], True, True),
])
def test_ssl_flag_semantics(flags: list[str], use_ssl: bool, mutual: bool) -> None:
    from server.cli import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args(["serve", "--model-repository", ".", *flags]))
    assert (settings.grpc_use_ssl, settings.grpc_use_ssl_mutual) == (use_ssl, mutual)
