"""The Python client's transport security: TLS files or an explicit plaintext, never a
silent fallback; kmsctl's --ca/--cert/--key/--no-tls and KMSD_CA/CERT/KEY/NO_TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from kms_client import KmsClient, TlsFiles
from kms_client.cli import build_parser, transport
from kms_client.cluster import ClusterClient
from kmsd.auth import certs


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    certs.create_ca(tmp_path)
    made = certs.issue_client(tmp_path, "alice")
    return TlsFiles(certs.ca_files(tmp_path).cert, made.cert, made.key)


def test_a_transport_must_be_chosen(files: TlsFiles) -> None:
    for make in (KmsClient, ClusterClient):
        with pytest.raises(ValueError, match="no transport security chosen"):
            make(["127.0.0.1:1"])
        with pytest.raises(ValueError, match="choose one"):
            make(["127.0.0.1:1"], tls=files, plaintext=True)
        make(["127.0.0.1:1"], tls=files).close()
        make(["127.0.0.1:1"], plaintext=True).close()
        make(["127.0.0.1:1"], credentials=files.credentials()).close()


def test_tls_files(files: TlsFiles, tmp_path: Path) -> None:
    assert isinstance(files.credentials(), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="go together"):
        TlsFiles(files.ca, files.cert)
    with pytest.raises(OSError):
        TlsFiles(tmp_path / "missing.crt").credentials()
    assert TlsFiles.from_env({}) is None
    env = {"KMSD_CA": "ca.pem", "KMSD_CERT": "me.pem", "KMSD_KEY": "me.key"}
    assert TlsFiles.from_env(env) == TlsFiles("ca.pem", "me.pem", "me.key")
    with pytest.raises(ValueError, match="KMSD_CA is not"):
        TlsFiles.from_env({"KMSD_CERT": "me.pem", "KMSD_KEY": "me.key"})


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args([*argv, "list-keys"])


def test_kmsctl_transport_options(files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KMSD_CA", "KMSD_CERT", "KMSD_KEY", "KMSD_NO_TLS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="kmsd speaks mutual TLS"):
        transport(_args())
    given = ("--ca", str(files.ca), "--cert", str(files.cert), "--key", str(files.key))
    credentials, plaintext = transport(_args(*given))
    assert credentials is not None and not plaintext
    # The older spellings still work.
    credentials, _ = transport(_args("--tls-ca", str(files.ca)))
    assert credentials is not None
    assert transport(_args("--no-tls")) == (None, True)
    with pytest.raises(ValueError, match="exclude each other"):
        transport(_args("--no-tls", "--ca", str(files.ca)))
    with pytest.raises(ValueError, match="go together"):
        transport(_args("--ca", str(files.ca), "--key", str(files.key)))

    monkeypatch.setenv("KMSD_CA", str(files.ca))
    monkeypatch.setenv("KMSD_CERT", str(files.cert))
    monkeypatch.setenv("KMSD_KEY", str(files.key))
    credentials, plaintext = transport(_args())
    assert credentials is not None and not plaintext
    monkeypatch.setenv("KMSD_CERT", str(files.ca) + ".missing")
    with pytest.raises(OSError):
        transport(_args())
    # Options win over the environment (and do not mix with it).
    credentials, _ = transport(_args(*given))
    assert credentials is not None
    for name in ("KMSD_CA", "KMSD_CERT", "KMSD_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("KMSD_NO_TLS", "1")
    assert transport(_args()) == (None, True)
