"""Transport security of the Python client: kmsd speaks mutual TLS.

`TlsFiles(ca, cert, key)` names PEM files: the CA bundle that signed the kmsd
nodes' certificates, and this caller's certificate and private key, whose URI SAN
(else CN) is the caller's principal on the server. kmsctl takes them from
`--ca/--cert/--key` or `KMSD_CA`, `KMSD_CERT`, `KMSD_KEY` (`TlsFiles.from_env`).
A plaintext connection (only a loopback `kmsd dev --plaintext` accepts one) must be
asked for explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_CA = "KMSD_CA"
ENV_CERT = "KMSD_CERT"
ENV_KEY = "KMSD_KEY"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA bundle to verify kmsd nodes with, and the client certificate
    chain and private key presented to them (both or neither)."""

    ca: str | Path
    cert: str | Path | None = None
    key: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its private key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files (again at every call: new channels see replaced files)."""
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=None if self.key is None else Path(self.key).read_bytes(),
            certificate_chain=None if self.cert is None else Path(self.cert).read_bytes(),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TlsFiles | None:
        """From KMSD_CA, KMSD_CERT and KMSD_KEY; None when none is set."""
        ca, cert, key = (environ.get(name) or None for name in (ENV_CA, ENV_CERT, ENV_KEY))
        if ca is None and cert is None and key is None:
            return None
        if ca is None:
            raise ValueError(f"{ENV_CERT}/{ENV_KEY} are set but {ENV_CA} is not")
        return cls(ca, cert, key)


def channel_credentials(
    tls: TlsFiles | None, credentials: grpc.ChannelCredentials | None, plaintext: bool
) -> grpc.ChannelCredentials | None:
    """The credentials of a client's channels; None for plaintext. Exactly one of the
    three must be chosen: there is no silent fallback to plaintext."""
    chosen = (tls is not None) + (credentials is not None) + bool(plaintext)
    if chosen == 0:
        raise ValueError(
            "no transport security chosen: pass tls=TlsFiles(ca, cert, key) for kmsd's "
            "mutual TLS, or plaintext=True for a loopback `kmsd dev --plaintext`"
        )
    if chosen > 1:
        raise ValueError("choose one of tls=, credentials= and plaintext=True")
    if tls is not None:
        return tls.credentials()
    return credentials


def open_channel(
    endpoint: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A channel to `endpoint`: secure with `credentials`, plaintext when they are None."""
    if credentials is None:
        return grpc.insecure_channel(endpoint, options)
    return grpc.secure_channel(endpoint, credentials, options)
