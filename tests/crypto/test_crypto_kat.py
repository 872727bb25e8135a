"""Known-answer test for the symmetric ciphertext format: the exact vector published in
docs/ciphertext-format.md, checked against kmsd and re-derived without kmsd's code."""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsd.crypto import ciphertext, context

DOC = Path(__file__).parents[2] / "docs" / "ciphertext-format.md"
BACKING_KEY = bytes(range(0x20))
KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
NONCE = bytes(range(0xA0, 0xB0))
IV = bytes(range(0xC0, 0xCC))
PLAINTEXT = b"kmsd known-answer test"
CONTEXT = {"purpose": "kat", "tenant": "acme"}

CANONICAL_CONTEXT_HEX = (
    "0000000200000007707572706f7365000000036b61740000000674656e616e740000000461636d65"
)
HKDF_INFO_HEX = "6b6d73642f76312f73796d6d6574726963011111111122223333444455555555555500000001"
DERIVED_KEY_HEX = "811126722164240bbcff896749e092a691ca2b91c146d2b786c29ed04e3b65ec"
BLOB_HEX = (
    "01"
    "11111111222233334444555555555555"
    "00000001"
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
    "c0c1c2c3c4c5c6c7c8c9cacb"
    "63f8dee92716cb804f44174fa27f9b0056006e18d5ab"
    "20461ea7f059cd4bc95f815b0577c434"
)


def fixed_rng(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)

    def rng(n: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == n
        return chunk

    return rng


def test_kat_canonical_context() -> None:
    assert context.canonical_encryption_context(CONTEXT).hex() == CANONICAL_CONTEXT_HEX


def test_kat_blob_from_kmsd() -> None:
    blob = ciphertext.encrypt(BACKING_KEY, KEY_ID, 1, PLAINTEXT, CONTEXT, fixed_rng(NONCE, IV))
    assert blob.hex() == BLOB_HEX
    assert len(blob) == len(PLAINTEXT) + ciphertext.OVERHEAD
    assert ciphertext.decrypt(BACKING_KEY, bytes.fromhex(BLOB_HEX), CONTEXT) == PLAINTEXT


def test_kat_independent_rederivation() -> None:
    # Built from the spec with cryptography's primitives only: no kmsd code below.
    header = b"\x01" + KEY_ID.bytes + struct.pack(">I", 1) + NONCE + IV
    assert len(header) == 49
    info = b"kmsd/v1/symmetric" + header[:21]
    assert info.hex() == HKDF_INFO_HEX
    k = HKDF(algorithm=SHA256(), length=32, salt=NONCE, info=info).derive(BACKING_KEY)
    assert k.hex() == DERIVED_KEY_HEX
    pairs = sorted((a.encode(), b.encode()) for a, b in CONTEXT.items())
    ctx = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(a)) + a + struct.pack(">I", len(b)) + b for a, b in pairs
    )
    assert ctx.hex() == CANONICAL_CONTEXT_HEX
    blob = header + AESGCM(k).encrypt(IV, PLAINTEXT, header + ctx)
    assert blob.hex() == BLOB_HEX


def test_kat_matches_the_document() -> None:
    doc = DOC.read_text(encoding="utf-8")
    flat = "".join(doc.split())
    for value in (BLOB_HEX, DERIVED_KEY_HEX, CANONICAL_CONTEXT_HEX, HKDF_INFO_HEX):
        assert value in flat


def test_document_snippet_reproduces_the_vector(capsys: pytest.CaptureFixture[str]) -> None:
    doc = DOC.read_text(encoding="utf-8")
    snippets = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(snippets) == 1
    exec(compile(snippets[0], str(DOC), "exec"), {"__name__": "kat_snippet"})
    assert capsys.readouterr().out.strip() == BLOB_HEX
