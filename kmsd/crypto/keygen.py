"""Fresh random key material and data keys, and the public id of a material version.

Owns `new_symmetric_key_material`, `new_data_key` and `material_id`. Randomness comes
from an injectable `rng` so that tests (and the log: material is made before a command
is proposed) can supply fixed bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Callable

from kmsd.errors import ValidationError

__all__ = [
    "DATA_KEY_MAX_BYTES",
    "DATA_KEY_MIN_BYTES",
    "SYMMETRIC_KEY_BYTES",
    "material_id",
    "new_data_key",
    "new_symmetric_key_material",
]

SYMMETRIC_KEY_BYTES = 32
DATA_KEY_MIN_BYTES = 1
DATA_KEY_MAX_BYTES = 1024

_U32 = struct.Struct(">I").pack


def _draw(rng: Callable[[int], bytes], n: int) -> bytes:
    out = rng(n)
    if len(out) != n:
        raise ValueError("rng returned the wrong number of bytes")
    return out


def new_symmetric_key_material(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """Returns 32 random bytes: the backing key of one material version (AES-256)."""
    return _draw(rng, SYMMETRIC_KEY_BYTES)


def new_data_key(number_of_bytes: int, rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """Returns `number_of_bytes` random bytes (1..1024, AWS's NumberOfBytes range).

    Raises ValidationError("number_of_bytes", ...) outside that range.
    """
    if (
        isinstance(number_of_bytes, bool)
        or not isinstance(number_of_bytes, int)
        or not DATA_KEY_MIN_BYTES <= number_of_bytes <= DATA_KEY_MAX_BYTES
    ):
        raise ValidationError(
            "number_of_bytes",
            f"must be an integer from {DATA_KEY_MIN_BYTES} to {DATA_KEY_MAX_BYTES}",
        )
    return _draw(rng, number_of_bytes)


def material_id(key_id: uuid.UUID, version: int) -> str:
    """Returns SHA-256(key_id.bytes ‖ uint32-BE version) as 64 lowercase hex chars.

    A stable public name for one material version (CurrentKeyMaterialId). It is
    computed from identifiers only, so it reveals nothing about the material.
    Raises ValueError if `version` is outside 1..2^32-1.
    """
    if not 1 <= version <= 0xFFFFFFFF:
        raise ValueError("material version must be in 1..2^32-1")
    return hashlib.sha256(key_id.bytes + _U32(version)).hexdigest()
