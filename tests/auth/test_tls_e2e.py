"""Mutual TLS against real `kmsd dev` processes: who is refused, what the audit trail
records as the principal, kmsctl's TLS options, certificates replaced while the node
runs, and the loopback-only plaintext mode."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from audit_records import audit_records
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kmsd.auth import certs
from kmsd_process import ADMIN_PRINCIPAL, KmsdProcess

pytestmark = pytest.mark.e2e

DEADLINE_S = 30.0


def credentials(ca: Path, files: certs.CertFiles | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=None if files is None else files.key.read_bytes(),
        certificate_chain=None if files is None else files.cert.read_bytes(),
    )


def random_bytes(endpoint: str, creds: grpc.ChannelCredentials | None) -> bytes:
    channel = (
        grpc.insecure_channel(endpoint) if creds is None else grpc.secure_channel(endpoint, creds)
    )
    with channel:
        stub = pb_grpc.KeyManagementServiceStub(channel)
        reply = stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=8), timeout=10)
        return bytes(reply.plaintext)


def kmsctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_")}
    return subprocess.run(
        [sys.executable, "-m", "kms_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        check=False,
    )


def test_clients_without_a_valid_certificate_are_refused(kmsd: KmsdProcess, tmp_path: Path) -> None:
    ca = kmsd.ca_path
    other = tmp_path / "other-ca"
    certs.create_ca(other, "kmsd-dev")
    impostor = certs.issue_client(other, "admin")  # the admin's very name, another CA
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    expired = certs.issue_client(
        kmsd.tls_dir, "expired", not_after=past, files=certs.client_files(tmp_path, "expired")
    )
    for what, creds in {
        "no client certificate": credentials(ca, None),
        "a certificate of another CA": credentials(ca, impostor),
        "an expired certificate": credentials(ca, expired),
    }.items():
        with pytest.raises(grpc.RpcError) as error:
            random_bytes(kmsd.endpoint, creds)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, what
    with pytest.raises(grpc.RpcError) as error:
        random_bytes(kmsd.endpoint, None)  # plaintext
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(random_bytes(kmsd.endpoint, kmsd.credentials())) == 8


def test_audit_records_the_certificate_uri_san(kmsd: KmsdProcess, tmp_path: Path) -> None:
    alice = certs.issue_client(kmsd.tls_dir, "alice", files=certs.client_files(tmp_path, "alice"))
    kmsd.stub().CreateKey(pb.CreateKeyRequest(description="audited"))
    try:
        random_bytes(kmsd.endpoint, credentials(kmsd.ca_path, alice))
    except grpc.RpcError as error:  # allowed or denied: recorded either way
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    records = audit_records(kmsd.data_dir / "audit")
    principals = {(r["operation"], r["principal"]) for r in records}
    assert ("CreateKey", ADMIN_PRINCIPAL) in principals
    assert ("GenerateRandom", "spiffe://kmsd-dev/user/alice") in principals
    assert "anonymous" not in {r["principal"] for r in records}


def test_kmsctl_tls_options_and_environment(kmsd: KmsdProcess) -> None:
    env = kmsd.kmsctl_env()
    made = kmsctl("--json", "create-key", "--description", "from kmsctl", env=env)
    assert made.returncode == 0, made.stderr
    options = [
        "--endpoint", kmsd.endpoint,
        "--ca", str(kmsd.ca_path), "--cert", str(kmsd.cert_path), "--key", str(kmsd.key_path),
    ]  # fmt: skip
    listed = kmsctl(*options, "list-keys", env={})
    assert listed.returncode == 0, listed.stderr
    status = kmsctl("cluster", "status", env=env)
    assert status.returncode == 0, status.stderr

    missing = kmsctl("--endpoint", kmsd.endpoint, "list-keys", env={})
    assert missing.returncode == 2
    assert "mutual TLS" in missing.stderr and "KMSD_CA" in missing.stderr
    half = kmsctl(*options[:4], "--cert", str(kmsd.cert_path), "list-keys", env={})
    assert half.returncode == 2 and "--cert and --key go together" in half.stderr
    plain = kmsctl(
        "--endpoint", kmsd.endpoint, "--no-tls", "--max-attempts", "1", "list-keys", env={}
    )
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def _replace(files: certs.CertFiles, source: certs.CertFiles) -> None:
    for src, dst in ((source.key, files.key), (source.cert, files.cert)):
        shutil.copy(src, dst.with_name(f".{dst.name}.new"))
        os.replace(dst.with_name(f".{dst.name}.new"), dst)


def test_node_certificates_are_replaced_without_a_restart(tmp_path: Path) -> None:
    process = KmsdProcess(tmp_path / "data").start()
    try:
        assert process.proc is not None and process.proc.stdout is not None
        banner = [process.proc.stdout.readline() for _ in range(6)]
        text = "".join(banner)
        for path in (process.ca_path, process.cert_path, process.key_path):
            assert str(path) in text, text
        assert "export KMSD_CA=" in text
        old_admin = process.credentials()
        assert len(random_bytes(process.endpoint, old_admin)) == 8

        new = tmp_path / "new-ca"
        certs.create_ca(new, "kmsd-dev")
        certs.issue_node(new, 1)
        new_admin = certs.issue_client(new, "admin")
        new_creds = credentials(certs.ca_files(new).cert, new_admin)
        with pytest.raises(grpc.RpcError):
            random_bytes(process.endpoint, new_creds)

        # What an operator does: new files in place (each an atomic rename); no restart.
        tls = process.tls_dir
        _replace(certs.node_files(tls, 1), certs.node_files(new, 1))
        _replace(certs.ca_files(tls), certs.ca_files(new))
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                assert len(random_bytes(process.endpoint, new_creds)) == 8
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the node did not pick up the new files"
                time.sleep(0.2)  # pacing between attempts, not a wait for state
        with pytest.raises(grpc.RpcError):
            random_bytes(process.endpoint, old_admin)
    finally:
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert "TLS files reloaded" in log
    assert "PRIVATE KEY" not in log


def test_plaintext_dev_is_loud_and_anonymous(tmp_path: Path) -> None:
    process = KmsdProcess(tmp_path / "plain", plaintext=True).start()
    try:
        assert len(random_bytes(process.endpoint, None)) == 8
        with process.client() as client:
            assert client.generate_random(4).plaintext
    finally:
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert "WARNING" in log and "plaintext: no authentication, loopback only" in log
    assert not (process.data_dir / "tls").exists()
    assert {r["principal"] for r in audit_records(process.data_dir / "audit")} == {"anonymous"}
