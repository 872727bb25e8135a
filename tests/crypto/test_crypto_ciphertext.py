"""Round trips, tampering, header parsing and context encoding of the ciphertext format."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.crypto import ciphertext
from kmsd.crypto.ciphertext import (
    HEADER_SIZE,
    MAX_PLAINTEXT,
    OVERHEAD,
    CiphertextHeader,
    decrypt,
    encrypt,
    parse_header,
)
from kmsd.crypto.context import canonical_encryption_context
from kmsd.errors import InvalidCiphertextError, ValidationError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
CTX = {"purpose": "test", "tenant": "acme"}


@pytest.fixture
def blob() -> bytes:
    return encrypt(KEY, KEY_ID, 3, b"hello world", CTX)


def test_constants() -> None:
    assert ciphertext.FORMAT_VERSION == 1
    assert HEADER_SIZE == 49
    assert OVERHEAD == 65
    assert ciphertext.MIN_CIPHERTEXT == 66
    assert MAX_PLAINTEXT == 4096
    assert ciphertext.MAX_CIPHERTEXT == 6144
    assert MAX_PLAINTEXT + OVERHEAD <= ciphertext.MAX_CIPHERTEXT


def test_round_trip(blob: bytes) -> None:
    assert len(blob) == 11 + OVERHEAD
    assert decrypt(KEY, blob, CTX) == b"hello world"
    assert parse_header(blob) == CiphertextHeader(KEY_ID, 3)


def test_round_trip_sizes_and_empty_context() -> None:
    for size in (1, 15, 16, 17, 1024, MAX_PLAINTEXT):
        pt = os.urandom(size)
        assert decrypt(KEY, encrypt(KEY, KEY_ID, 1, pt, {}), {}) == pt


def test_random_nonce_and_iv_each_call() -> None:
    a = encrypt(KEY, KEY_ID, 1, b"x", {})
    b = encrypt(KEY, KEY_ID, 1, b"x", {})
    assert a[21:37] != b[21:37]
    assert a[37:49] != b[37:49]
    assert a != b


def test_max_material_version() -> None:
    blob = encrypt(KEY, KEY_ID, 0xFFFFFFFF, b"x", {})
    assert parse_header(blob).material_version == 0xFFFFFFFF
    assert decrypt(KEY, blob, {}) == b"x"


@pytest.mark.parametrize("index", range(HEADER_SIZE))
def test_flip_each_header_byte(blob: bytes, index: int) -> None:
    bad = bytearray(blob)
    bad[index] ^= 0x01
    with pytest.raises(InvalidCiphertextError):
        decrypt(KEY, bytes(bad), CTX)


@pytest.mark.parametrize("index", [HEADER_SIZE, HEADER_SIZE + 5, -16, -8, -1])
def test_flip_body_or_tag(blob: bytes, index: int) -> None:
    bad = bytearray(blob)
    bad[index] ^= 0x80
    with pytest.raises(InvalidCiphertextError):
        decrypt(KEY, bytes(bad), CTX)


def test_truncation_and_extension(blob: bytes) -> None:
    for n in range(len(blob)):
        with pytest.raises(InvalidCiphertextError):
            decrypt(KEY, blob[:n], CTX)
    with pytest.raises(InvalidCiphertextError):
        decrypt(KEY, blob + b"\x00", CTX)


def test_wrong_backing_key(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextError):
        decrypt(OTHER_KEY, blob, CTX)


@pytest.mark.parametrize(
    "ctx",
    [
        {},
        {"purpose": "test"},
        {"purpose": "test", "tenant": "acme", "extra": ""},
        {"purpose": "test", "tenant": "acmE"},
        {"purpose": "test", "Tenant": "acme"},
        {"purpose": "test", "tenant": "acme "},
        {"purposetest": "", "tenant": "acme"},
    ],
)
def test_wrong_context(blob: bytes, ctx: dict[str, str]) -> None:
    with pytest.raises(InvalidCiphertextError):
        decrypt(KEY, blob, ctx)


def test_context_order_does_not_matter(blob: bytes) -> None:
    assert decrypt(KEY, blob, {"tenant": "acme", "purpose": "test"}) == b"hello world"


def test_error_is_opaque(blob: bytes) -> None:
    messages = set()
    attempts: list[tuple[bytes, bytes, dict[str, str]]] = [
        (KEY, blob[:10], CTX),  # truncated
        (KEY, b"\x02" + blob[1:], CTX),  # unknown version
        (OTHER_KEY, blob, CTX),  # wrong material
        (KEY, blob, {}),  # wrong context
    ]
    for key, candidate, ctx in attempts:
        with pytest.raises(InvalidCiphertextError) as info:
            decrypt(key, candidate, ctx)
        messages.add(str(info.value))
        assert info.value.__cause__ is None
    assert len(messages) == 1


def test_parse_header_rejects_short_and_garbage(blob: bytes) -> None:
    for bad in (b"", b"\x01", blob[:65], b"\x00" * 100, b"\x02" + blob[1:], b"\xff" * 66):
        with pytest.raises(InvalidCiphertextError):
            parse_header(bad)
    assert parse_header(blob[:66]) == CiphertextHeader(KEY_ID, 3)


def test_parse_header_rejects_material_version_zero(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextError):
        parse_header(blob[:17] + b"\x00\x00\x00\x00" + blob[21:])


def test_encrypt_rejects_programming_errors() -> None:
    with pytest.raises(ValueError):
        encrypt(KEY[:16], KEY_ID, 1, b"x", {})
    for version in (0, -1, 2**32):
        with pytest.raises(ValueError):
            encrypt(KEY, KEY_ID, version, b"x", {})
    with pytest.raises(ValueError):
        encrypt(KEY, KEY_ID, 1, b"", {})
    with pytest.raises(ValueError):
        encrypt(KEY, KEY_ID, 1, b"x", {}, rng=lambda n: b"\x00" * (n - 1))
    with pytest.raises(ValueError):
        decrypt(KEY[:16], encrypt(KEY, KEY_ID, 1, b"x", {}), {})


def test_rng_is_used_nonce_then_iv() -> None:
    calls: list[int] = []

    def rng(n: int) -> bytes:
        calls.append(n)
        return bytes([len(calls)]) * n

    blob = encrypt(KEY, KEY_ID, 1, b"x", {}, rng=rng)
    assert calls == [16, 12]
    assert blob[21:37] == b"\x01" * 16
    assert blob[37:49] == b"\x02" * 12


# --- canonical encryption context ---


def test_canonical_empty() -> None:
    assert canonical_encryption_context({}) == b"\x00\x00\x00\x00"


def test_canonical_ambiguity() -> None:
    assert canonical_encryption_context({"ab": "c"}) != canonical_encryption_context({"a": "bc"})
    assert canonical_encryption_context({"a": ""}) != canonical_encryption_context({})
    assert canonical_encryption_context({"a": "b", "c": "d"}) != canonical_encryption_context(
        {"a": "b\x00\x00\x00\x01c"}
    )


def test_canonical_layout_and_order() -> None:
    assert canonical_encryption_context({"b": "2", "a": "1"}) == (
        b"\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x011\x00\x00\x00\x01b\x00\x00\x00\x012"
    )
    # Sorted by UTF-8 bytes of the key: "Z" (0x5a) < "a" (0x61) < "é" (0xc3 0xa9).
    enc = canonical_encryption_context({"é": "x", "a": "y", "Z": "z"})
    assert enc.index(b"Z") < enc.index(b"\x01a") < enc.index("é".encode())
    assert canonical_encryption_context({"k": "é"}) == (
        b"\x00\x00\x00\x01\x00\x00\x00\x01k\x00\x00\x00\x02\xc3\xa9"
    )


def test_canonical_rejects_unencodable() -> None:
    with pytest.raises(ValidationError):
        canonical_encryption_context({"k": "\ud800"})


# --- properties ---

_text = st.text(max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(min_size=1, max_size=MAX_PLAINTEXT),
    ctx=st.dictionaries(_text, _text, max_size=5),
    version=st.integers(min_value=1, max_value=2**32 - 1),
    key=st.binary(min_size=32, max_size=32),
    key_id=st.uuids(),
)
def test_property_round_trip(
    plaintext: bytes, ctx: dict[str, str], version: int, key: bytes, key_id: uuid.UUID
) -> None:
    blob = encrypt(key, key_id, version, plaintext, ctx)
    assert len(blob) == len(plaintext) + OVERHEAD
    assert parse_header(blob) == CiphertextHeader(key_id, version)
    assert decrypt(key, blob, dict(reversed(list(ctx.items())))) == plaintext


@settings(max_examples=200, deadline=None)
@given(a=st.dictionaries(_text, _text, max_size=4), b=st.dictionaries(_text, _text, max_size=4))
def test_property_canonical_is_injective(a: dict[str, str], b: dict[str, str]) -> None:
    assert (canonical_encryption_context(a) == canonical_encryption_context(b)) == (a == b)
