"""Mutual TLS over real gRPC connections in this process (grpc.aio server and channels on
loopback): who a caller is (`principal_of`), who a peer is (`PeerTls.node_id_of`),
who is refused, and certificates replaced without a restart."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from kmsd.auth import certs
from kmsd.auth.identity import ANONYMOUS, principal_of
from kmsd.auth.tls import PeerTls, ServerTls, TlsError, TlsFiles, load_material

METHOD = "/test.Who/Ask"
DEADLINE_S = 20.0


class Who:
    """Answers each call with the caller's principal and, given a PeerTls, its node id."""

    def __init__(self, peers: PeerTls | None = None) -> None:
        self.peers = peers
        self.auth: dict[str, Any] = {}

    async def ask(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.auth = dict(context.auth_context())
        node = "-" if self.peers is None else str(self.peers.node_id_of(context))
        return f"{principal_of(context)} {node}".encode()


@asynccontextmanager
async def server(tls: ServerTls | None, who: Who | None = None) -> AsyncIterator[tuple[str, Who]]:
    who = who or Who()
    srv = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(who.ask)
    srv.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Who", {"Ask": handler}),)
    )
    port = srv.add_insecure_port("127.0.0.1:0") if tls is None else tls.add_port(srv, "127.0.0.1:0")
    await srv.start()
    try:
        yield f"127.0.0.1:{port}", who
    finally:
        await srv.stop(None)


async def ask(channel: grpc.aio.Channel) -> str:
    answer: bytes = await channel.unary_unary(METHOD)(b"", timeout=10)
    return answer.decode()


def client_credentials(ca: Path, files: certs.CertFiles | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=None if files is None else files.key.read_bytes(),
        certificate_chain=None if files is None else files.cert.read_bytes(),
    )


async def ask_with(address: str, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        return await ask(channel)


async def until(what: str, attempt: Callable[[], Awaitable[str]]) -> str:
    """Retries `attempt` until it answers (not raises), or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return await attempt()
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still refused after {DEADLINE_S}s") from None
            await asyncio.sleep(0.05)  # pacing between attempts, not a wait for state


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA of cluster "t" with nodes 1-2 and the clients alice (URI SAN), carol (CN only)."""
    d = tmp_path / "pki"
    certs.create_ca(d, "t")
    for node_id in (1, 2):
        certs.issue_node(d, node_id)
    certs.issue_client(d, "alice")
    certs.issue_client(d, "carol", uri="")
    return d


def node_tls(d: Path, node_id: int) -> TlsFiles:
    files = certs.node_files(d, node_id)
    return TlsFiles(files.cert, files.key, certs.ca_files(d).cert)


def test_principal_is_the_uri_san_else_the_cn_else_anonymous(pki: Path) -> None:
    ca = certs.ca_files(pki).cert

    async def main() -> None:
        async with server(ServerTls(node_tls(pki, 1))) as (address, who):
            alice = client_credentials(ca, certs.client_files(pki, "alice"))
            assert await ask_with(address, alice) == "spiffe://t/user/alice -"
            # The auth context keys kmsd.auth.identity relies on, from a real handshake.
            assert who.auth["peer_uri"] == [b"spiffe://t/user/alice"]
            assert who.auth["x509_common_name"] == [b"alice"]
            assert who.auth["transport_security_type"] == [b"ssl"]
            carol = client_credentials(ca, certs.client_files(pki, "carol"))
            assert await ask_with(address, carol) == "carol -"
        async with server(None) as (address, _), grpc.aio.insecure_channel(address) as channel:
            assert await ask(channel) == f"{ANONYMOUS} -"

    asyncio.run(main())


def test_clients_without_a_valid_certificate_are_refused(pki: Path, tmp_path: Path) -> None:
    ca = certs.ca_files(pki).cert
    other = tmp_path / "other"
    certs.create_ca(other, "t")  # the same names, another key
    certs.issue_client(other, "alice")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = certs.issue_client(pki, "old", not_after=past)
    refused = {
        "no certificate": client_credentials(ca),
        "another CA": client_credentials(ca, certs.client_files(other, "alice")),
        "expired": client_credentials(ca, expired),
    }

    async def main() -> None:
        async with server(ServerTls(node_tls(pki, 1))) as (address, _):
            for what, credentials in refused.items():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await ask_with(address, credentials)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, what
            # A plaintext client gets nowhere either.
            async with grpc.aio.insecure_channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await ask(channel)
            good = client_credentials(ca, certs.client_files(pki, "alice"))
            assert await ask_with(address, good) == "spiffe://t/user/alice -"

    asyncio.run(main())


def test_peer_certificates_map_to_member_ids(pki: Path) -> None:
    certs.issue_node(pki, 7, cluster_id="other-cluster")  # same CA, another cluster
    certs.issue_client(pki, "kms-c", uri="spiffe://corp/kms/c")  # an explicit principal
    certs.issue_node(pki, 3)  # node 3's default identity, which node 3 does not use
    ca = certs.ca_files(pki).cert
    peers = PeerTls(node_tls(pki, 1), "t", {3: "spiffe://corp/kms/c"})
    assert peers.principal_of_node(2) == "spiffe://t/node/2"
    assert peers.principal_of_node(3) == "spiffe://corp/kms/c"

    async def main() -> None:
        async with server(peers, Who(peers)) as (address, _):
            # A peer dials with PeerTls.channel: its own certificate, the CA, the host name.
            node2 = PeerTls(node_tls(pki, 2), "t")
            async with node2.channel(address) as channel:
                assert await ask(channel) == "spiffe://t/node/2 2"
            answers = {
                name: await ask_with(address, client_credentials(ca, files))
                for name, files in {
                    "client": certs.client_files(pki, "alice"),
                    "other cluster": certs.node_files(pki, 7),
                    "explicit": certs.client_files(pki, "kms-c"),
                    "default of an explicit member": certs.node_files(pki, 3),
                }.items()
            }
            assert answers == {
                "client": "spiffe://t/user/alice None",
                "other cluster": "spiffe://other-cluster/node/7 None",
                "explicit": "spiffe://corp/kms/c 3",
                "default of an explicit member": "spiffe://t/node/3 None",
            }

    asyncio.run(main())
    with pytest.raises(TlsError, match="two members"):
        peers.set_principals({1: "spiffe://x/a", 2: "spiffe://x/a"})


def _install(source: Path, node_id: int, live: Path) -> None:
    """Copies a node's certificate, key and CA into `live`, each by an atomic rename, the
    key before the certificate (as `kmsd certs` writes them)."""
    files = certs.node_files(source, node_id)
    for src, name in ((files.key, "node.key"), (certs.ca_files(source).cert, "ca.crt")):
        shutil.copy(src, live / f".{name}")
        os.replace(live / f".{name}", live / name)
    shutil.copy(files.cert, live / ".node.crt")
    os.replace(live / ".node.crt", live / "node.crt")


def test_new_certificates_are_used_without_a_restart(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = tmp_path / "new"
    certs.create_ca(new, "t")
    certs.issue_node(new, 1)
    certs.issue_client(new, "alice")
    live = tmp_path / "live"
    live.mkdir()
    _install(pki, 1, live)
    files = TlsFiles(live / "node.crt", live / "node.key", live / "ca.crt")
    tls = PeerTls(files, "t", reload_interval=0)
    old_client = client_credentials(certs.ca_files(pki).cert, certs.client_files(pki, "alice"))
    new_client = client_credentials(certs.ca_files(new).cert, certs.client_files(new, "alice"))

    async def main() -> None:
        async with server(tls) as (address, _):
            assert await ask_with(address, old_client) == "spiffe://t/user/alice -"
            with pytest.raises(grpc.aio.AioRpcError):
                await ask_with(address, new_client)  # trusts only the new CA
            generation = tls.generation
            before = tls.channel_credentials()

            # A broken replacement (another certificate's key) is ignored, and said so.
            shutil.copy(certs.node_files(pki, 2).key, live / "node.key")
            with caplog.at_level(logging.WARNING, logger="kmsd.auth.tls"):
                assert await ask_with(address, old_client) == "spiffe://t/user/alice -"
            assert tls.generation == generation
            assert "not reloaded" in caplog.text and "is not the private key" in caplog.text
            assert "PRIVATE KEY" not in caplog.text

            _install(new, 1, live)
            answer = await until("a client of the new CA", lambda: ask_with(address, new_client))
            assert answer == "spiffe://t/user/alice -"
            assert tls.generation > generation
            assert tls.channel_credentials() is not before  # new peer channels: new files
            with pytest.raises(grpc.aio.AioRpcError):
                await ask_with(address, old_client)

    asyncio.run(main())


def test_unusable_files_refuse_to_start(pki: Path, tmp_path: Path) -> None:
    files = node_tls(pki, 1)
    with pytest.raises(TlsError, match="cannot read the certificate"):
        load_material(TlsFiles(tmp_path / "missing.crt", files.key, files.ca))
    with pytest.raises(TlsError, match="is not the private key"):
        ServerTls(TlsFiles(files.cert, certs.node_files(pki, 2).key, files.ca))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TlsError, match="is not an unencrypted PEM private key") as error:
        load_material(TlsFiles(files.cert, garbage, files.ca))
    assert "nope" not in str(error.value)
