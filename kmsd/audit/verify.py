"""Offline verification of audit files: `verify(paths) -> VerifyResult`.

The logic lives in `kms_client.audit_verify` (standard library only), so that
`kmsctl audit verify` runs wherever the client is installed, without kmsd; the
kmsd distribution ships `kms_client` too, so this import always works.
"""

from __future__ import annotations

from kms_client.audit_verify import (
    BadRecord,
    ChainChecker,
    Recovery,
    VerifyResult,
    parse_record,
    verify,
)

__all__ = ["BadRecord", "ChainChecker", "Recovery", "VerifyResult", "parse_record", "verify"]
