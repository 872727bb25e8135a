"""`kmsd.auth.certs` and `kmsd certs`: the CA, node and client certificates kmsd's
mutual TLS uses, with the identities (URI SANs) principals come from."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmsd.auth import certs


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_node_certificate_identities_and_usages(tmp_path: Path) -> None:
    ca = certs.create_ca(tmp_path, "prod-eu")
    assert certs.cluster_id_of_ca(tmp_path) == "prod-eu"
    made = certs.issue_node(tmp_path, 3, hosts=["kms-c", "10.0.3.10"])
    assert made == certs.node_files(tmp_path, 3)
    cert = certs.load_cert(made.cert)
    san = _san(cert)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://prod-eu/node/3"]
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "kms-c"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.3.10"),
    }
    assert _usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == certs.load_cert(ca.cert).subject
    for key in (ca.key, made.key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert made.cert.stat().st_mode & 0o777 == 0o644


def test_client_certificate_principal(tmp_path: Path) -> None:
    certs.create_ca(tmp_path, "kmsd-dev")
    cert = certs.load_cert(certs.issue_client(tmp_path, "alice").cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert _san(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        certs.user_principal("kmsd-dev", "alice")
    ]
    assert _usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    other = certs.load_cert(certs.issue_client(tmp_path, "bob", uri="spiffe://corp/svc/x").cert)
    assert _san(other).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://corp/svc/x"
    ]
    cn_only = certs.load_cert(certs.issue_client(tmp_path, "carol", uri="").cert)
    assert _san(cn_only).get_values_for_type(x509.UniformResourceIdentifier) == []


def test_validity_can_be_in_the_past_for_tests(tmp_path: Path) -> None:
    certs.create_ca(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    made = certs.issue_client(tmp_path, "old", not_after=now - datetime.timedelta(days=1))
    cert = certs.load_cert(made.cert)
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc < cert.not_valid_after_utc


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="no CA in"):
        certs.issue_node(tmp_path, 1, cluster_id="c")
    certs.create_ca(tmp_path)
    with pytest.raises(certs.CertError, match="exists"):
        certs.create_ca(tmp_path)
    certs.issue_node(tmp_path, 1)
    with pytest.raises(certs.CertError, match="exists"):
        certs.issue_node(tmp_path, 1)
    certs.issue_node(tmp_path, 1, overwrite=True)
    with pytest.raises(certs.CertError, match="trust domain"):
        certs.create_ca(tmp_path / "x", "Not A Domain")
    with pytest.raises(certs.CertError, match="may hold only"):
        certs.issue_client(tmp_path, "../evil")
    with pytest.raises(certs.CertError, match="not a URI"):
        certs.issue_client(tmp_path, "dave", uri="dave")
    with pytest.raises(certs.CertError, match="positive"):
        certs.issue_node(tmp_path, 0)


def test_dev_pki_is_made_once_and_renewed_when_expiring(tmp_path: Path) -> None:
    first = certs.ensure_dev_pki(tmp_path, "kmsd-dev", [1, 2, 3])
    assert first.admin_principal == "spiffe://kmsd-dev/user/admin"
    assert sorted(first.nodes) == [1, 2, 3]
    pem = first.nodes[2].cert.read_bytes()
    again = certs.ensure_dev_pki(tmp_path, "kmsd-dev", [1, 2, 3, 4, 5])
    assert again.nodes[2].cert.read_bytes() == pem  # kept
    assert again.nodes[5].cert.exists()
    # An expired leaf is made again, under the same CA.
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    certs.issue_node(tmp_path, 2, not_after=soon, overwrite=True)
    ca_pem = first.ca.cert.read_bytes()
    certs.ensure_dev_pki(tmp_path, "kmsd-dev", [1, 2])
    renewed = certs.load_cert(first.nodes[2].cert)
    assert renewed.not_valid_after_utc > soon
    assert first.ca.cert.read_bytes() == ca_pem


def _kmsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsd", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kmsd_certs_command(tmp_path: Path) -> None:
    d = str(tmp_path / "tls")
    made = _kmsd("init", "--dir", d, "--cluster-id", "ops")
    assert made.returncode == 0, made.stderr
    assert "cluster id ops" in made.stdout
    node = _kmsd("node", "--dir", d, "--id", "2", "--host", "kms-b")
    assert node.returncode == 0, node.stderr
    assert "spiffe://ops/node/2" in node.stdout
    client = _kmsd("client", "--dir", d, "--name", "alice", "--days", "30")
    assert client.returncode == 0, client.stderr
    assert "spiffe://ops/user/alice" in client.stdout
    cert = certs.load_cert(tmp_path / "tls" / "client-alice.crt")
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 29 <= days <= 30
    assert "kms-b" in _san(certs.load_cert(tmp_path / "tls" / "node-2.crt")).get_values_for_type(
        x509.DNSName
    )
    again = _kmsd("init", "--dir", d)
    assert again.returncode == 1 and "exists" in again.stderr
    # Nothing secret on the terminal.
    for done in (made, node, client, again):
        assert "PRIVATE KEY" not in done.stdout + done.stderr
