"""CRC32C checksums and the record frame shared by the WAL and snapshot files."""

from __future__ import annotations

import struct

import google_crc32c

RECORD_HEADER = struct.Struct("<II")
"""uint32-LE payload length ‖ uint32-LE CRC32C of the payload."""


def crc32c(data: bytes, *more: bytes) -> int:
    """CRC32C (Castagnoli) of `data`, followed by `more` (as if joined)."""
    crc = int(google_crc32c.value(data))
    for part in more:
        crc = int(google_crc32c.extend(crc, part))
    return crc


def frame(payload: bytes) -> bytes:
    """One WAL record as stored: header then payload."""
    return RECORD_HEADER.pack(len(payload), crc32c(payload)) + payload
