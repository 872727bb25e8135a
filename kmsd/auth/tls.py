"""Mutual TLS for a node's two ports: the client API (`ServerTls`) and Raft peers
(`PeerTls`), from the PEM files `[tls]` names, reloaded without a restart.

* Servers require a client certificate that chains to `[tls].ca_file`. Their
  credentials are `grpc.dynamic_ssl_server_credentials`: before each new
  connection's handshake gRPC asks for the current certificate configuration, and
  the files are looked at again (their size, mtime and inode) at most every
  `[tls].reload_interval_seconds`. New files are used from the next connection on;
  a broken or mismatched set (a half-done replacement) is logged and ignored, the
  previous one stays in use.
* Outgoing peer channels (`PeerTls.channel`) present this node's certificate and
  verify the peer's against the same CA and its address's host name. Each new
  channel is made from the current files; `PeerTls.generation` changes when they
  change, so a transport can replace its long-lived channels.
* `PeerTls.node_id_of(context)` maps a peer certificate to a member id through the
  members' principals (`[[cluster.members]].principal`, default
  `spiffe://<cluster.id>/node/<id>`): the transport refuses a message whose sender
  differs from it.

Private keys are never logged; errors name files, never their contents.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsd.auth.certs import node_principal
from kmsd.auth.identity import HasAuthContext, identities
from kmsd.config import Config

log = logging.getLogger(__name__)

EXPIRY_WARNING = datetime.timedelta(days=7)


class TlsError(ValueError):
    """The TLS files cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class TlsFiles:
    """A node's certificate chain, its private key and the CA bundle, as PEM files."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_config(cls, config: Config) -> TlsFiles | None:
        """The `[tls]` files (relative paths from data_dir); None in plaintext mode."""
        tls = config.tls
        if tls.plaintext:
            return None
        if tls.cert_file is None or tls.key_file is None or tls.ca_file is None:
            raise TlsError("[tls]: cert_file, key_file and ca_file are required")
        return cls(
            config.tls_path(tls.cert_file),
            config.tls_path(tls.key_file),
            config.tls_path(tls.ca_file),
        )


@dataclass(frozen=True)
class Material:
    """The PEM bytes of one consistent set of files."""

    cert_chain: bytes
    private_key: bytes
    root_certificates: bytes
    not_after: datetime.datetime


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path}: {error.strerror}") from error


def load_material(files: TlsFiles) -> Material:
    """Reads and checks the three files: PEM, the key matches the certificate."""
    chain = _read(files.cert, "certificate")
    key_pem = _read(files.key, "private key")
    roots = _read(files.ca, "CA bundle")
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as error:
        raise TlsError(f"{files.cert} holds no PEM certificate") from error
    try:
        x509.load_pem_x509_certificates(roots)
    except ValueError as error:
        raise TlsError(f"{files.ca} holds no PEM certificate") from error
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        # Never the exception text: it could quote the key.
        raise TlsError(f"{files.key} is not an unencrypted PEM private key") from error
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise TlsError(f"{files.key} is not the private key of the certificate {files.cert}")
    return Material(chain, key_pem, roots, leaf.not_valid_after_utc)


def _signature(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    signature = []
    for path in (files.cert, files.key, files.ca):
        try:
            st = os.stat(path)
        except OSError:
            signature.append((-1, -1, -1))
        else:
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class _Watched:
    """The files' current material, re-read when they change (looked at no more often
    than every `interval` seconds). Thread-safe: gRPC calls in from its own threads."""

    def __init__(
        self,
        files: TlsFiles,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = _signature(files)
        self._material = load_material(files)  # at start, a bad file is fatal
        self._generation = 1
        self._checked = clock()
        self._rejected: tuple[tuple[int, int, int], ...] | None = None
        _warn_expiry(files, self._material)

    def current(self) -> tuple[int, Material]:
        """(generation, material), after looking at the files if the interval passed."""
        with self._lock:
            now = self._clock()
            if now - self._checked >= self._interval:
                self._checked = now
                self._refresh()
            return self._generation, self._material

    def _refresh(self) -> None:
        signature = _signature(self.files)
        if signature == self._signature or signature == self._rejected:
            return
        try:
            material = load_material(self.files)
        except TlsError as error:
            # Perhaps a replacement half done: keep serving with the previous files.
            self._rejected = signature
            log.warning("TLS files not reloaded, keeping the previous ones: %s", error)
            return
        self._signature, self._material, self._rejected = signature, material, None
        self._generation += 1
        log.info(
            "TLS files reloaded: %s (certificate valid until %s)",
            self.files.cert,
            material.not_after.isoformat(),
        )
        _warn_expiry(self.files, material)


def _warn_expiry(files: TlsFiles, material: Material) -> None:
    left = material.not_after - datetime.datetime.now(datetime.UTC)
    if left < EXPIRY_WARNING:
        log.warning(
            "the certificate %s %s on %s: replace it (it is reloaded without a restart)",
            files.cert,
            "expired" if left.total_seconds() <= 0 else "expires",
            material.not_after.isoformat(),
        )


def _server_config(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)],
        root_certificates=material.root_certificates,
    )


class ServerTls:
    """The TLS side of a gRPC server port: a certificate, and client certificates
    required, verified against the CA bundle."""

    def __init__(
        self,
        files: TlsFiles,
        reload_interval: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._watched = _Watched(files, reload_interval, clock=clock)

    @classmethod
    def from_config(cls, config: Config) -> ServerTls | None:
        """None in plaintext mode. Raises TlsError if a file is missing or broken."""
        files = TlsFiles.from_config(config)
        if files is None:
            return None
        return cls(files, config.tls.reload_interval_seconds)

    @property
    def files(self) -> TlsFiles:
        return self._watched.files

    @property
    def generation(self) -> int:
        """Changes (increases) whenever new files were loaded."""
        return self._watched.current()[0]

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files: see the module docstring."""
        generation, material = self._watched.current()
        served = [generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before every handshake; None keeps the current config.
            generation, material = self._watched.current()
            if generation == served[0]:
                return None
            served[0] = generation
            return _server_config(material)

        return grpc.dynamic_ssl_server_credentials(
            _server_config(material),
            fetch,  # type: ignore[arg-type]  # the stub omits the documented None
            require_client_authentication=True,
        )

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        """Binds `listen` with TLS and client certificates required; returns the port."""
        port = server.add_secure_port(listen, self.server_credentials())
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        return port


_DEFAULT_NODE = re.compile(r"spiffe://(?P<cluster>[^/]+)/node/(?P<id>[1-9][0-9]{0,18})")


class PeerTls(ServerTls):
    """TLS between the nodes of a cluster: the peer port's server side (`add_port`),
    the channels to other nodes (`channel`), and who a peer is (`node_id_of`)."""

    def __init__(
        self,
        files: TlsFiles,
        cluster_id: str,
        principals: Mapping[int, str] = {},  # noqa: B006 (read only)
        reload_interval: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(files, reload_interval, clock=clock)
        self.cluster_id = cluster_id
        self._lock = threading.Lock()
        self._by_principal: dict[str, int] = {}
        self._principal_of: dict[int, str] = {}
        self.set_principals(principals)
        self._credentials: tuple[int, grpc.ChannelCredentials] | None = None

    @classmethod
    def from_config(cls, config: Config) -> PeerTls | None:
        """None in plaintext mode. Raises TlsError if a file is missing or broken."""
        files = TlsFiles.from_config(config)
        if files is None:
            return None
        principals = {m.id: m.principal for m in config.members if m.principal}
        return cls(files, config.cluster_id, principals, config.tls.reload_interval_seconds)

    def default_principal(self, node_id: int) -> str:
        return node_principal(self.cluster_id, node_id)

    def set_principals(self, principals: Mapping[int, str]) -> None:
        """Members whose certificates carry another identity than the default (e.g.
        from a company CA); every other node id N is `spiffe://<cluster>/node/N`."""
        by_principal: dict[str, int] = {}
        for node_id, principal in principals.items():
            if principal in by_principal and by_principal[principal] != node_id:
                raise TlsError(f"principal {principal} is given to two members")
            by_principal[principal] = node_id
        with self._lock:
            self._by_principal = by_principal
            self._principal_of = dict(principals)

    def principal_of_node(self, node_id: int) -> str:
        """The identity node `node_id`'s certificate must carry."""
        with self._lock:
            return self._principal_of.get(node_id) or self.default_principal(node_id)

    def node_id_of_identities(self, found: Iterable[str]) -> int | None:
        """The member id the certificate identities name, or None."""
        with self._lock:
            for identity in found:
                node_id = self._by_principal.get(identity)
                if node_id is not None:
                    return node_id
                match = _DEFAULT_NODE.fullmatch(identity)
                if match and match["cluster"] == self.cluster_id:
                    node_id = int(match["id"])
                    # A member with an explicit principal is only that principal.
                    if node_id not in self._principal_of:
                        return node_id
        return None

    def node_id_of(self, context: HasAuthContext) -> int | None:
        """The member id of the peer on the other end of `context` (its certificate's
        URI SAN, else CN, mapped through the members' principals), or None for a
        certificate that is no member's (a client's, another cluster's)."""
        return self.node_id_of_identities(identities(context.auth_context()))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """This node's certificate and the CA bundle, from the current files."""
        generation, material = self._watched.current()
        with self._lock:
            if self._credentials is None or self._credentials[0] != generation:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=material.root_certificates,
                    private_key=material.private_key,
                    certificate_chain=material.cert_chain,
                )
                self._credentials = (generation, credentials)
            return self._credentials[1]

    def channel(
        self, address: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        """A new asyncio channel to the peer at `address` (host:port; its certificate
        must name that host), made from the current files."""
        return grpc.aio.secure_channel(address, self.channel_credentials(), options)
