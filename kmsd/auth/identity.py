"""The caller's identity (principal) as mutual TLS establishes it (DESIGN.md §5).

A client certificate's URI SAN (e.g. `spiffe://kmsd.dev/user/alice`), else its
subject CN. Without TLS (the loopback-only plaintext mode) every caller is
`ANONYMOUS`.

gRPC's auth context of a TLS connection (checked by tests/auth/test_tls_inprocess.py
against a real handshake) has `peer_uri` (the URI SANs), `x509_subject_alternative_name`
(every SAN: DNS names, IP addresses, URIs...) and `x509_common_name`; a plaintext
connection has none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import grpc

ANONYMOUS = "anonymous"

Ctx = grpc.aio.ServicerContext[Any, Any]

_URI = "peer_uri"
_SAN = "x509_subject_alternative_name"
_CN = "x509_common_name"


class HasAuthContext(Protocol):
    """A server-side context, sync or asyncio."""

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def identities(auth: Mapping[str, Iterable[bytes]]) -> list[str]:
    """Every identity the peer's certificate carries, the principal first: its URI SANs,
    then its subject CN. Empty without a client certificate."""
    found: list[str] = []
    for value in auth.get(_URI) or ():
        found.append(value.decode("utf-8", "replace"))
    for value in auth.get(_SAN) or ():
        # Older gRPC versions list URIs among the SANs only; DNS/IP SANs have no "://".
        text = value.decode("utf-8", "replace")
        if "://" in text and text not in found:
            found.append(text)
    for value in auth.get(_CN) or ():
        found.append(value.decode("utf-8", "replace"))
    return found


def principal_of(context: HasAuthContext) -> str:
    """The caller's principal: URI SAN, else CN, else ANONYMOUS (no client certificate)."""
    found = identities(context.auth_context())
    return found[0] if found else ANONYMOUS
