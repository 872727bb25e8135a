"""The caller's identity (principal) as mutual TLS establishes it (DESIGN.md §5).

A client certificate's URI SAN (e.g. `spiffe://kmsd.dev/user/alice`), else its
subject CN. Without TLS (the loopback-only plaintext mode) every caller is
`ANONYMOUS`.
"""

from __future__ import annotations

from typing import Any

import grpc

ANONYMOUS = "anonymous"

Ctx = grpc.aio.ServicerContext[Any, Any]


def principal_of(context: Ctx) -> str:
    """The caller's principal: URI SAN, else CN, else ANONYMOUS (no client certificate)."""
    auth = context.auth_context()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        values = auth.get(key)
        if values:
            # A certificate may carry several SANs; the URI one is the identity.
            for value in values:
                text = value.decode("utf-8", "replace")
                if key == "x509_common_name" or "://" in text:
                    return text
    return ANONYMOUS
