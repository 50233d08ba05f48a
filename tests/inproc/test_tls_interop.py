"""Certificates from the test PKI and the mesh CA work with OpenSSL and Node.js peers."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from config.ca import CertificateAuthority
from tests.pki import TestPKI
from ztunnel.identity import (
    Certificate,
    SpiffeId,
    TrustBundle,
    generate_key,
    make_csr,
    private_key_pem,
)
from ztunnel.tls import peer_identity, server_context


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install it (Debian package providing {tool})")
    return path


class OneShotServer:
    """Accepts one mesh mTLS connection on 127.0.0.1, records the peer, says hello."""

    def __init__(self, cert: Certificate, trust: TrustBundle) -> None:
        self.ctx = server_context(cert, trust)
        self.trust = trust
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(15)
        self.port = self.listener.getsockname()[1]
        self.peer: SpiffeId | None = None
        self.alpn: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
            raw.settimeout(15)
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                self.peer = peer_identity(tls, self.trust)
                self.alpn = tls.selected_alpn_protocol()
                tls.sendall(b"hello\n")
        except Exception as exc:
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(20)


def _openssl_client(port: int, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
            # s_client sends only the first -cert block unless told about the chain
            "-cert", str(cert), "-cert_chain", str(cert), "-key", str(key), "-CAfile", str(ca),
            "-verify_return_error", "-tls1_3", "-alpn", "h2", "-ign_eof",
        ],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("intermediate", [False, True])
def test_openssl_client_with_written_files(tmp_path: Path, intermediate: bool) -> None:
    pki = TestPKI(intermediate=intermediate)
    client = pki.issue("shop", "frontend")
    cert, key, ca = pki.write_files(client, tmp_path)
    server = OneShotServer(pki.issue("shop", "cart"), pki.bundle)
    proc = _openssl_client(server.port, cert, key, ca)
    server.join()
    assert server.error is None, server.error
    assert server.peer == client.identity
    assert server.alpn == "h2"
    assert "hello" in proc.stdout
    assert "Verification: OK" in proc.stdout + proc.stderr or "Verify return code: 0" in (
        proc.stdout
    )


def test_openssl_verifies_ca_issued_leaves_for_client_auth(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "data", "cluster.local")
    key = generate_key()
    ident = SpiffeId("cluster.local", "shop", "cart")
    cert = Certificate.from_pem(ca.sign_csr(make_csr(ident, key), ident), private_key_pem(key))
    (tmp_path / "leaf.pem").write_bytes(cert.full_chain_pem)
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle().roots_pem)
    proc = subprocess.run(
        [_require("openssl"), "verify", "-CAfile", str(tmp_path / "ca.pem"),
         "-purpose", "sslclient", str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


NODE_CLIENT = r"""
const tls = require('tls'); const fs = require('fs');
const [port, cert, key, ca] = process.argv.slice(1);
const s = tls.connect({host: '127.0.0.1', port: +port, cert: fs.readFileSync(cert),
  key: fs.readFileSync(key), ca: fs.readFileSync(ca), ALPNProtocols: ['h2'],
  minVersion: 'TLSv1.3', checkServerIdentity: () => undefined}, () => {
  const peer = s.getPeerCertificate();
  console.log('SAN', peer.subjectaltname, 'ALPN', s.alpnProtocol, 'AUTH', s.authorized);
});
s.on('data', d => process.stdout.write(d));
s.on('error', e => { console.error('ERR', e.code, e.message); process.exit(2); });
s.on('end', () => process.exit(0));
"""


def test_node_tls_client_with_written_files(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    client = pki.issue("shop", "frontend")
    cert, key, ca = pki.write_files(client, tmp_path)
    server_cert = pki.issue("shop", "cart")
    server = OneShotServer(server_cert, pki.bundle)
    proc = subprocess.run(
        [_require("node"), "-e", NODE_CLIENT, str(server.port), str(cert), str(key), str(ca)],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    server.join()
    assert proc.returncode == 0, proc.stderr
    assert server.error is None, server.error
    assert server.peer == client.identity
    assert f"SAN URI:{server_cert.identity} ALPN h2 AUTH true" in proc.stdout
    assert "hello" in proc.stdout


def test_server_identity_is_not_checked_by_hostname(tmp_path: Path) -> None:
    """Hostname checks are off (identity is the URI SAN): any SNI or none works."""
    pki = TestPKI()
    server = OneShotServer(pki.issue("shop", "cart"), pki.bundle)
    from ztunnel.tls import client_context

    ctx = client_context(pki.issue("shop", "frontend"), pki.bundle)
    assert not ctx.check_hostname
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="not-the-server.example") as tls,
    ):
        assert peer_identity(tls, pki.bundle) == pki.identity("shop", "cart")
        assert tls.recv(6) == b"hello\n"
    server.join()
    assert server.error is None
    assert isinstance(ctx, ssl.SSLContext)
