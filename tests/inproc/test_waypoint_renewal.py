"""Certificate renewal and root rotation reach the waypoint's new handshakes, both ways."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

import aiohttp
import structlog
from cryptography import x509

from tests.inproc.test_waypoint_e2e import Mesh, bound, get, which
from tests.pki import TestPKI
from waypoint.cli import FileIdentity, renew_once
from waypoint.http1 import close_conn
from waypoint.model import UpstreamEndpoint
from waypoint.upstream import Upstreams
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.hbone.request import Accept, ConnectRequest, Decision
from ztunnel.hbone.server import HboneServer
from ztunnel.identity import Certificate, SpiffeId
from ztunnel.tls import client_context, server_context


def serial(der: bytes | None) -> int:
    assert der
    return int(x509.load_der_x509_certificate(der).serial_number)


def cert_serial(cert: Certificate) -> int:
    return int(x509.load_pem_x509_certificate(cert.cert_pem).serial_number)


def short_lived(pki: TestPKI) -> Certificate:
    """A 6 s waypoint certificate: renewal is due at its half-life, 3 s in."""
    return pki.issue("app", "wp", ttl=6, not_before=time.time() - 0.5)


def write_pair(cert: Certificate, cert_path: Path, key_path: Path) -> None:
    """What a renewal does: new key and certificate, newer mtimes."""
    key_path.write_bytes(cert.key_pem)
    cert_path.write_bytes(cert.full_chain_pem)
    later = time.time() + 1
    os.utime(key_path, (later, later))
    os.utime(cert_path, (later, later))


async def served_serial(address: tuple[str, int], cert: Certificate, pki: TestPKI) -> int:
    """A new client handshake with the waypoint: the serial of what it presents."""
    ctx = client_context(cert, pki.bundle)
    _, writer = await asyncio.open_connection(*address, ssl=ctx)
    try:
        tls = writer.get_extra_info("ssl_object")
        return serial(tls.getpeercert(binary_form=True))
    finally:
        writer.close()


async def test_renewed_certificate_and_added_root_reach_new_inbound_handshakes(
        tmp_path: Path) -> None:
    pki = TestPKI()
    mesh = Mesh({"front": 1}, [], {}, pki=pki)
    first = short_lived(pki)
    cert_p, key_p, ca_p = pki.write_files(first, tmp_path)
    identity = FileIdentity(cert_p, key_p, ca_p, "cluster.local")
    mesh.wp_cert = first
    async with (mesh.running(identity=identity), mesh.forward("front") as url,
                aiohttp.ClientSession() as s):
        assert mesh.waypoint is not None
        wp = mesh.waypoint
        assert await served_serial(wp.address, mesh.client_cert, pki) == cert_serial(first)
        status, text, _ = await get(s, url + "/before")
        assert status == 200 and which(text) == "front"

        renewed = short_lived(pki)
        write_pair(renewed, cert_p, key_p)
        with structlog.testing.capture_logs() as logs:
            assert await served_serial(wp.address, mesh.client_cert, pki) == cert_serial(renewed)
        assert any(e["event"] == "serving renewed certificate" for e in logs)
        # a connection made before the renewal keeps working
        status, text, _ = await get(s, url + "/after")
        assert status == 200 and which(text) == "front"

        # root rotation: a client with a certificate of a new root is refused until the
        # waypoint's roots file holds that root, then accepted without a restart
        other = TestPKI()
        newcomer = other.issue("app", "newcomer")
        pool = HboneConnectionPool(connect_timeout=5)
        try:
            await pool.open_stream(
                src_identity_cert=newcomer, trust=pki.bundle, dst_identity=first.identity,
                src_ip=None, dst=wp.address, authority=f"{mesh.vips['front']}:80",
                forwarded_for=None)
            raise AssertionError("a client of an unknown root got through")
        except HboneError as e:
            refused = str(e)
        finally:
            await pool.close()
        assert "rejected our certificate" in refused or "closed" in refused, refused
        ca_p.write_bytes(pki.root_pem + other.root_pem)
        later = time.time() + 2
        os.utime(ca_p, (later, later))
        async with mesh.forward("front", cert=newcomer) as url2:
            status, text, _ = await get(s, url2 + "/new-root")
        assert status == 200 and which(text) == "front"
        assert mesh.backends["front"][0].peers[-1] == str(mesh.wp_cert.identity)


async def test_half_written_renewal_keeps_the_previous_certificate(tmp_path: Path) -> None:
    pki = TestPKI()
    first = pki.issue("app", "wp")
    cert_p, key_p, ca_p = pki.write_files(first, tmp_path)
    identity = FileIdentity(cert_p, key_p, ca_p, "cluster.local")
    assert identity()[0] == first
    renewed = pki.issue("app", "wp")
    cert_p.write_bytes(renewed.full_chain_pem)  # the key is not there yet
    later = time.time() + 1
    os.utime(cert_p, (later, later))
    with structlog.testing.capture_logs() as logs:
        assert identity()[0] == first
        assert identity()[0] == first
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "keeping the previous ones" in warnings[0]["event"]
    write_pair(renewed, cert_p, key_p)
    assert identity()[0] == renewed


async def test_renewal_failure_is_logged_with_what_to_check(tmp_path: Path) -> None:
    from config.push import PushClient

    pki = TestPKI()
    cert_p, key_p, ca_p = pki.write_files(short_lived(pki), tmp_path)
    identity = FileIdentity(cert_p, key_p, ca_p, "cluster.local")
    identity()
    client = PushClient("127.0.0.1:1", "app/wp", tmp_path / "data",
                        trust_domain="cluster.local")
    with structlog.testing.capture_logs() as logs:
        ok = await renew_once(client, str(tmp_path / "missing-token"), identity)
    assert not ok
    errors = [e for e in logs if e["log_level"] == "error"]
    assert errors and "renewal failed" in errors[0]["event"]
    assert "missing-token" in errors[0]["error"]
    assert errors[0]["expires"] == identity()[0].not_after


class RecordingHbone(HboneServer):
    """An endpoint's HBONE terminator that records the serial of each client certificate."""

    serials: list[int]

    def _verify(self, ssl_object: ssl.SSLObject | None) -> SpiffeId:
        assert ssl_object is not None
        self.serials.append(serial(ssl_object.getpeercert(binary_form=True)))
        return super()._verify(ssl_object)


async def test_upstream_connections_present_the_renewed_certificate(tmp_path: Path) -> None:
    pki = TestPKI()
    first = short_lived(pki)
    cert_p, key_p, ca_p = pki.write_files(first, tmp_path)
    identity = FileIdentity(cert_p, key_p, ca_p, "cluster.local")
    sock = bound("127.0.0.1", 0)
    port = sock.getsockname()[1]
    ep_cert = pki.issue("app", "front")

    async def accept(req: ConnectRequest) -> Decision:
        async def echo(stream: object) -> None:
            return None

        return Accept(serve=echo)

    server = RecordingHbone(sock, server_context(ep_cert, pki.bundle), pki.bundle, accept)
    server.serials = []
    ups = Upstreams(identity, hbone_port=port)
    ep = UpstreamEndpoint(workload_uid="front-0", address="127.0.0.1", port=8080,
                          identity=str(ep_cert.identity),
                          hbone=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.run())
        await server.started()
        try:
            s1 = await ups.connect(ep)
            s2 = await ups.connect(ep)  # shares the pooled connection
            assert server.serials == [cert_serial(first)]
            old = ups.pool.connections()
            renewed = short_lived(pki)
            write_pair(renewed, cert_p, key_p)
            s3 = await ups.connect(ep)
            assert server.serials == [cert_serial(first), cert_serial(renewed)]
            assert all(not c.usable for c in old)  # told to drain (GOAWAY)
            for st in (s1, s2, s3):
                close_conn(st)
        finally:
            await ups.close()
            server.close()


async def test_renewal_at_half_life_through_the_control_plane_reaches_the_listener(
        tmp_path: Path) -> None:
    from config.push import NODE_CERT, NODE_KEY, TRUST, PushClient
    from tests.inproc.test_api_push import plane
    from tests.inproc.test_waypoint_process import CaIssuer
    from ztunnel.identity import generate_key, make_csr, private_key_pem

    async with plane(tmp_path) as p:
        data = tmp_path / "wp-data"
        client = PushClient(p.address, "app/wp", data, trust_domain="cluster.local",
                            token=p.tokens.create("app/wp"))
        await client.ensure_joined()
        joined = x509.load_pem_x509_certificate((data / NODE_CERT).read_bytes())
        cn = joined.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        ident = SpiffeId("cluster.local", "app", "wp")
        identity = FileIdentity(data / NODE_CERT, data / NODE_KEY, data / TRUST,
                                "cluster.local")
        # a renewal the control plane refuses (a workload certificate, not the one a
        # join gave) is reported, not taken for done
        key = generate_key()
        chain = p.ca.sign_csr(make_csr(ident, key), ident, ttl=4, now=time.time() - 2.5)
        write_pair(Certificate.from_pem(chain, private_key_pem(key)), data / NODE_CERT,
                   data / NODE_KEY)
        with structlog.testing.capture_logs() as logs:
            assert not await renew_once(client, None, identity)
        assert any(e["log_level"] == "error" and "not renewed" in e["event"] for e in logs)

        # a 4 s certificate 2.5 s into its life: past half-life, still valid
        key = generate_key()
        chain = p.ca.sign_csr(make_csr(ident, key), ident, ttl=4, now=time.time() - 2.5,
                              subject_common_name=str(cn))
        write_pair(Certificate.from_pem(chain, private_key_pem(key)), data / NODE_CERT,
                   data / NODE_KEY)
        short = identity()[0]
        assert time.time() >= short.renewal_time()
        mesh = Mesh({"front": 1}, [], {}, pki=CaIssuer(p.ca))
        async with mesh.running(identity=identity):
            assert mesh.waypoint is not None
            address = mesh.waypoint.address
            async def presented() -> int:
                ctx = client_context(mesh.client_cert, p.ca.trust_bundle())
                _, writer = await asyncio.open_connection(*address, ssl=ctx)
                try:
                    return serial(writer.get_extra_info("ssl_object")
                                  .getpeercert(binary_form=True))
                finally:
                    writer.close()

            assert await presented() == cert_serial(short)
            assert await renew_once(client, None, identity)
            renewed = identity()[0]
            assert renewed != short and renewed.not_after > short.not_after + 3600
            assert await presented() == cert_serial(renewed)
