"""The symmetric ciphertext blob (format version 1): layout, key derivation, encrypt, decrypt.

Blob = version(1) ‖ key id(16) ‖ material version(4, BE) ‖ HKDF nonce(16) ‖ GCM IV(12)
‖ AES-256-GCM ciphertext ‖ tag(16). Each message gets its own AES key,
HKDF-SHA256(backing key, salt=nonce, info="kmsd/v1/symmetric" ‖ header[0:21]), so the
2^32 random-IV bound of a single GCM key never limits how much one KMS key encrypts.
AAD = the 49-byte header ‖ the canonical encryption context. Byte-level spec and a
known-answer vector: docs/ciphertext-format.md.

This is the service's hot path: one struct pack, one HKDF, one AESGCM per call.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsd.crypto.context import canonical_encryption_context
from kmsd.errors import InvalidCiphertextError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "IV_SIZE",
    "KEY_SIZE",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "MIN_CIPHERTEXT",
    "NONCE_SIZE",
    "OVERHEAD",
    "TAG_SIZE",
    "CiphertextHeader",
    "decrypt",
    "encrypt",
    "parse_header",
]

FORMAT_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 16
IV_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 49
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 65
#: Plaintext is never empty, so no valid blob is shorter than this.
MIN_CIPHERTEXT = OVERHEAD + 1
#: API limits (AWS's): enforced by request validation, exported for it.
MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144

KDF_INFO_PREFIX = b"kmsd/v1/symmetric"
#: Bytes of the header bound into the HKDF info: version, key id, material version.
_KDF_HEADER_BYTES = 21
_MAX_MATERIAL_VERSION = 0xFFFFFFFF

# version, key id, material version, nonce, IV: packed in one call on encrypt.
_HEADER = struct.Struct(">B16sI16s12s")
_U32_AT = struct.Struct(">I").unpack_from
_SHA256 = SHA256()

assert _HEADER.size == HEADER_SIZE


@dataclass(frozen=True)
class CiphertextHeader:
    """What a blob says about itself before it is authenticated: which key and material
    version to try. Not trustworthy until `decrypt` succeeds."""

    key_id: uuid.UUID
    material_version: int


def _derive(backing_key: bytes, nonce: bytes, header_prefix: bytes) -> AESGCM:
    hkdf = HKDF(
        algorithm=_SHA256, length=KEY_SIZE, salt=nonce, info=KDF_INFO_PREFIX + header_prefix
    )
    return AESGCM(hkdf.derive(backing_key))


def parse_header(blob: bytes) -> CiphertextHeader:
    """Reads key id and material version. Raises InvalidCiphertextError if the blob is
    shorter than MIN_CIPHERTEXT, has an unknown format version or material version 0."""
    if len(blob) < MIN_CIPHERTEXT or blob[0] != FORMAT_VERSION:
        raise InvalidCiphertextError()
    (material_version,) = _U32_AT(blob, 17)
    if material_version == 0:
        raise InvalidCiphertextError()
    return CiphertextHeader(uuid.UUID(bytes=bytes(blob[1:17])), material_version)


def encrypt(
    backing_key: bytes,
    key_id: uuid.UUID,
    material_version: int,
    plaintext: bytes,
    encryption_context: Mapping[str, str],
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Encrypts `plaintext` (1..MAX_PLAINTEXT bytes, checked by the caller) under material
    `material_version` of key `key_id`. Draws rng(16) for the nonce, then rng(12) for the IV.

    Raises ValueError for a programming error: wrong key size, material version outside
    1..2^32-1, empty plaintext, or an rng returning the wrong number of bytes.
    """
    if len(backing_key) != KEY_SIZE:
        raise ValueError("backing key must be 32 bytes")
    if not 1 <= material_version <= _MAX_MATERIAL_VERSION:
        raise ValueError("material version must be in 1..2^32-1")
    if not plaintext:
        # An empty plaintext would give a blob parse_header rejects.
        raise ValueError("plaintext must not be empty")
    nonce = rng(NONCE_SIZE)
    iv = rng(IV_SIZE)
    if len(nonce) != NONCE_SIZE or len(iv) != IV_SIZE:
        raise ValueError("rng returned the wrong number of bytes")
    header = _HEADER.pack(FORMAT_VERSION, key_id.bytes, material_version, nonce, iv)
    aead = _derive(backing_key, nonce, header[:_KDF_HEADER_BYTES])
    aad = header + canonical_encryption_context(encryption_context)
    return header + aead.encrypt(iv, plaintext, aad)


def decrypt(backing_key: bytes, blob: bytes, encryption_context: Mapping[str, str]) -> bytes:
    """Decrypts a blob made by `encrypt` with the material its header names.

    Raises InvalidCiphertextError, always with the same message, for every failure:
    malformed or truncated blob, wrong key or material, tampering, wrong context.
    Raises ValueError if `backing_key` is not 32 bytes (a programming error).
    """
    if len(backing_key) != KEY_SIZE:
        raise ValueError("backing key must be 32 bytes")
    if len(blob) < MIN_CIPHERTEXT or blob[0] != FORMAT_VERSION:
        raise InvalidCiphertextError()
    view = memoryview(blob)
    header = bytes(view[:HEADER_SIZE])
    aead = _derive(backing_key, header[21:37], header[:_KDF_HEADER_BYTES])
    aad = header + canonical_encryption_context(encryption_context)
    try:
        # The body is passed as a view: up to 6 KiB the AEAD can read in place.
        return aead.decrypt(header[37:49], view[HEADER_SIZE:], aad)
    except InvalidTag:
        raise InvalidCiphertextError() from None
