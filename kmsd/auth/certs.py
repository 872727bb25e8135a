"""A small certificate authority for development, tests and simple deployments.

Makes, with the `cryptography` library, what mutual TLS between kmsd nodes and their
clients needs (docs/security.md):

* a CA (`ca.crt`, `ca.key`), whose subject carries the cluster id (organization);
* node certificates (`node-<id>.crt/.key`): serverAuth + clientAuth (a node is a
  server to clients and peers, and a client of its peers), SAN IP 127.0.0.1, DNS
  localhost, any extra hosts, and URI `spiffe://<cluster>/node/<id>`, the identity a
  peer's certificate must carry;
* client certificates (`client-<name>.crt/.key`): clientAuth, subject CN = name and
  URI SAN `spiffe://<cluster>/user/<name>` (or another URI), the caller's principal.

Keys are ECDSA P-256, written mode 0600 and never logged. `kmsd certs` is the
command line; `ensure_dev_pki` is what `kmsd dev` uses. A production deployment may
use any CA instead: kmsd only needs PEM files and the URI SAN (or CN) conventions.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CLUSTER_ID = "kmsd"
CA_DAYS = 3650
LEAF_DAYS = 365
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# A SPIFFE trust domain: lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock differences


class CertError(Exception):
    """A certificate cannot be made (bad argument, missing CA, existing file)."""


@dataclass(frozen=True)
class CertFiles:
    """A certificate (PEM) and its private key (PEM, mode 0600)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """What `kmsd dev` makes under `<data-dir>/tls/`."""

    directory: Path
    cluster_id: str
    ca: CertFiles
    nodes: dict[int, CertFiles]
    admin: CertFiles
    admin_principal: str


def node_principal(cluster_id: str, node_id: int) -> str:
    """The identity a node's certificate carries (URI SAN)."""
    return f"spiffe://{cluster_id}/node/{node_id}"


def user_principal(cluster_id: str, name: str) -> str:
    """The identity a client certificate made by `issue_client` carries (URI SAN)."""
    return f"spiffe://{cluster_id}/user/{name}"


def ca_files(directory: Path) -> CertFiles:
    return CertFiles(directory / "ca.crt", directory / "ca.key")


def node_files(directory: Path, node_id: int) -> CertFiles:
    return CertFiles(directory / f"node-{node_id}.crt", directory / f"node-{node_id}.key")


def client_files(directory: Path, name: str) -> CertFiles:
    return CertFiles(directory / f"client-{name}.crt", directory / f"client-{name}.key")


def _check_cluster_id(cluster_id: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(cluster_id):
        raise CertError(
            f"cluster id '{cluster_id}' cannot be a SPIFFE trust domain "
            "(lowercase letters, digits, '.', '-', '_')"
        )


def _check_name(what: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise CertError(f"{what} '{name}' may hold only letters, digits, '.', '-' and '_'")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Writes through a temporary file and a rename, so a reader (a node reloading its
    certificate) never sees half a file; the key file is 0600 from its creation."""
    if path.exists() and not overwrite:
        raise CertError(f"{path} exists (use --force to replace it)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _save(
    files: CertFiles, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, overwrite: bool
) -> CertFiles:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate on disk always has its key next to it.
    _write(files.key, key_pem, 0o600, overwrite)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite)
    return files


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        raise CertError(f"{path} is not a PEM certificate") from error


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as error:
        raise CertError(f"{path} is not an unencrypted PEM private key") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: only EC keys are supported for the CA")
    return key


def cluster_id_of_ca(directory: Path) -> str:
    """The cluster id `create_ca` recorded in the CA's subject (organization)."""
    cert = load_cert(ca_files(directory).cert)
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = names[0].value if names else DEFAULT_CLUSTER_ID
    return value if isinstance(value, str) else value.decode()


def create_ca(
    directory: Path,
    cluster_id: str = DEFAULT_CLUSTER_ID,
    *,
    days: int = CA_DAYS,
    overwrite: bool = False,
) -> CertFiles:
    """A self-signed CA in `directory` (ca.crt, ca.key)."""
    _check_cluster_id(cluster_id)
    if days < 1:
        raise CertError("a CA must be valid for at least one day")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
            x509.NameAttribute(NameOID.COMMON_NAME, f"kmsd CA {cluster_id}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save(ca_files(directory), cert, key, overwrite=overwrite)


def _san(hosts: Iterable[str], uris: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.UniformResourceIdentifier(uri) for uri in uris]
    return x509.SubjectAlternativeName(names)


def _issue(
    directory: Path,
    files: CertFiles,
    *,
    common_name: str,
    san: x509.SubjectAlternativeName,
    usages: Sequence[x509.ObjectIdentifier],
    days: int,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
    overwrite: bool,
) -> CertFiles:
    ca = ca_files(directory)
    if not ca.cert.exists() or not ca.key.exists():
        raise CertError(f"no CA in {directory}: run `kmsd certs init --dir {directory}` first")
    ca_cert, ca_key = load_cert(ca.cert), _load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    end = not_after or now + datetime.timedelta(days=days)
    start = not_before or min(now - _BACKDATE, end - datetime.timedelta(days=1))
    if end <= start:
        raise CertError("a certificate's validity must end after it starts")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(san, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _save(files, cert, key, overwrite=overwrite)


def issue_node(
    directory: Path,
    node_id: int,
    *,
    cluster_id: str | None = None,
    hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    overwrite: bool = False,
    files: CertFiles | None = None,
) -> CertFiles:
    """A node certificate signed by the CA in `directory`, valid for 127.0.0.1, localhost
    and `hosts` (the names its clients and peers dial it by)."""
    if node_id < 1:
        raise CertError("a node id is a positive integer")
    cluster = cluster_id or cluster_id_of_ca(directory)
    _check_cluster_id(cluster)
    return _issue(
        directory,
        files or node_files(directory, node_id),
        common_name=f"kmsd node {node_id}",
        san=_san([*DEFAULT_HOSTS, *hosts], [node_principal(cluster, node_id)]),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
        not_before=not_before,
        not_after=not_after,
        overwrite=overwrite,
    )


def issue_client(
    directory: Path,
    name: str,
    *,
    cluster_id: str | None = None,
    uri: str | None = None,
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    overwrite: bool = False,
    files: CertFiles | None = None,
) -> CertFiles:
    """A client certificate signed by the CA in `directory`: CN = `name`, URI SAN `uri`
    (default `spiffe://<cluster>/user/<name>`; "" for none, so the CN is the principal)."""
    _check_name("a client name", name)
    if uri is None:
        cluster = cluster_id or cluster_id_of_ca(directory)
        _check_cluster_id(cluster)
        uri = user_principal(cluster, name)
    elif uri and "://" not in uri:
        raise CertError(f"'{uri}' is not a URI (scheme://...)")
    return _issue(
        directory,
        files or client_files(directory, name),
        common_name=name,
        san=_san([], [uri] if uri else []),
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
        not_before=not_before,
        not_after=not_after,
        overwrite=overwrite,
    )


def _usable(files: CertFiles, margin: datetime.timedelta) -> bool:
    """True when both files exist and the certificate is valid for at least `margin`."""
    if not files.cert.exists() or not files.key.exists():
        return False
    try:
        return load_cert(files.cert).not_valid_after_utc > _now() + margin
    except CertError:
        return False


def ensure_dev_pki(directory: Path, cluster_id: str, node_ids: Iterable[int]) -> DevPki:
    """The CA, node certificates and `admin` client certificate of `kmsd dev`: made when
    missing, kept otherwise (a leaf expiring within a day is made again)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = ca_files(directory)
    if not _usable(ca, datetime.timedelta(days=1)) or cluster_id_of_ca(directory) != cluster_id:
        create_ca(directory, cluster_id, overwrite=True)
        renew_all = True
    else:
        renew_all = False
    margin = datetime.timedelta(days=1)
    nodes: dict[int, CertFiles] = {}
    for node_id in node_ids:
        files = node_files(directory, node_id)
        if renew_all or not _usable(files, margin):
            issue_node(directory, node_id, cluster_id=cluster_id, overwrite=True)
        nodes[node_id] = files
    admin = client_files(directory, "admin")
    if renew_all or not _usable(admin, margin):
        issue_client(directory, "admin", cluster_id=cluster_id, overwrite=True)
    return DevPki(directory, cluster_id, ca, nodes, admin, user_principal(cluster_id, "admin"))
