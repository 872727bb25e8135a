"""The envelope-encryption blob format and its local AES-256-GCM half.

`KmsClient.envelope_encrypt` asks kmsd for a data key (GenerateDataKey,
AES_256), encrypts the data locally with it and keeps only the wrapped copy of
the key; `KmsClient.envelope_decrypt` unwraps the key with Decrypt. This module
owns the byte layout, so data can be read back by any language:

    offset  size  field
    0       5     magic b"KMSE1" (format version 1)
    5       2     n = length of the wrapped data key, unsigned big-endian
    7       n     wrapped data key: the CiphertextBlob kmsd returned (1-6144 bytes)
    7+n     12    nonce for AES-256-GCM, random per blob
    19+n    rest  AES-256-GCM ciphertext of the data followed by its 16-byte tag

The GCM additional authenticated data is the magic b"KMSE1". The wrapped key
need not be covered by it: a swapped wrapped key unwraps to a different data
key (or fails in kmsd), so the tag check fails either way. The encryption
context is not stored: it is bound to the wrapped key by kmsd, and the reader
supplies it again, as with Decrypt.

`cryptography` is imported only when a blob is sealed or opened, so the rest of
the client works without it (install the ``kmsd-client[envelope]`` extra).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"KMSE1"
NONCE_SIZE = 12
TAG_SIZE = 16
DATA_KEY_SIZE = 32
_LEN = struct.Struct(">H")
_MAX_WRAPPED = 0xFFFF


class InvalidEnvelopeError(ValueError):
    """The blob is not a KMSE1 envelope, or it failed authentication."""


@dataclass(frozen=True)
class Envelope:
    """The parsed parts of a KMSE1 blob."""

    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        """Serialises the envelope in the documented layout."""
        if not 0 < len(self.wrapped_key) <= _MAX_WRAPPED:
            raise ValueError("wrapped key must be 1-65535 bytes")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        return b"".join(
            (MAGIC, _LEN.pack(len(self.wrapped_key)), self.wrapped_key, self.nonce, self.ciphertext)
        )

    @classmethod
    def parse(cls, blob: bytes) -> Envelope:
        """Splits a blob into its parts; raises InvalidEnvelopeError if malformed."""
        view = memoryview(blob)
        if bytes(view[: len(MAGIC)]) != MAGIC:
            raise InvalidEnvelopeError("not a KMSE1 envelope (bad magic)")
        pos = len(MAGIC)
        if len(view) < pos + _LEN.size:
            raise InvalidEnvelopeError("truncated KMSE1 envelope")
        (wrapped_len,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if wrapped_len == 0 or len(view) < pos + wrapped_len + NONCE_SIZE + TAG_SIZE:
            raise InvalidEnvelopeError("truncated KMSE1 envelope")
        wrapped = bytes(view[pos : pos + wrapped_len])
        pos += wrapped_len
        nonce = bytes(view[pos : pos + NONCE_SIZE])
        pos += NONCE_SIZE
        return cls(wrapped_key=wrapped, nonce=nonce, ciphertext=bytes(view[pos:]))


def _aesgcm(data_key: bytes) -> AESGCM:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "envelope encryption needs the 'cryptography' package "
            "(pip install 'kmsd-client[envelope]')"
        ) from exc
    if len(data_key) != DATA_KEY_SIZE:
        # A short key would silently select AES-128; the format promises AES-256.
        raise ValueError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
    return _AESGCM(data_key)


def seal(data_key: bytes, wrapped_key: bytes, plaintext: bytes) -> bytes:
    """Encrypts `plaintext` under `data_key` and returns the KMSE1 blob."""
    aead = _aesgcm(data_key)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = aead.encrypt(nonce, plaintext, MAGIC)
    return Envelope(wrapped_key=wrapped_key, nonce=nonce, ciphertext=ciphertext).to_bytes()


def open_envelope(data_key: bytes, envelope: Envelope) -> bytes:
    """Decrypts a parsed envelope with its unwrapped data key."""
    from cryptography.exceptions import InvalidTag

    aead = _aesgcm(data_key)
    try:
        return aead.decrypt(envelope.nonce, envelope.ciphertext, MAGIC)
    except InvalidTag:
        raise InvalidEnvelopeError("KMSE1 envelope failed authentication") from None
