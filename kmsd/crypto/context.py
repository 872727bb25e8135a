"""Canonical byte encoding of an encryption context, the part of the AAD callers choose.

Owns `canonical_encryption_context`. The encoding is length-prefixed so that no two
distinct maps share an encoding ({"ab": "c"} and {"a": "bc"} differ), and sorted so
that the caller's map order never matters. Layout: docs/ciphertext-format.md.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from kmsd.errors import ValidationError

__all__ = ["EMPTY_CONTEXT", "canonical_encryption_context"]

_U32 = struct.Struct(">I").pack

#: The encoding of an empty map: a zero pair count.
EMPTY_CONTEXT = b"\x00\x00\x00\x00"


def canonical_encryption_context(ctx: Mapping[str, str]) -> bytes:
    """Returns uint32-BE pair count, then each pair sorted by the UTF-8 bytes of its key,
    as uint32-BE len(key) ‖ key ‖ uint32-BE len(value) ‖ value (all UTF-8).

    Raises ValidationError("encryption_context", ...) if a key or value is not
    encodable as UTF-8 (a lone surrogate); proto strings never are.
    """
    if not ctx:
        # Most requests carry no context; skip the sort and join on the hot path.
        return EMPTY_CONTEXT
    try:
        # Keys are unique, so the tuple sort never falls through to comparing values.
        pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in ctx.items())
    except UnicodeEncodeError:
        raise ValidationError(
            "encryption_context", "keys and values must be valid Unicode text"
        ) from None
    parts = [_U32(len(pairs))]
    for key, value in pairs:
        parts += (_U32(len(key)), key, _U32(len(value)), value)
    return b"".join(parts)
