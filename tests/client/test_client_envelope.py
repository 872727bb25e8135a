"""Envelope encryption: KMSE1 layout, round trip through GenerateDataKey/Decrypt, tampering."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kms.v1 import resources_pb2 as res
from kms_fake import FakeKms

from kms_client.client import KmsClient
from kms_client.envelope import MAGIC, NONCE_SIZE, Envelope, InvalidEnvelopeError
from kms_client.errors import InvalidCiphertextException


@pytest.fixture
def key_id(client: KmsClient) -> str:
    return client.create_key("envelope").key_metadata.key_id


def test_round_trip(fake: FakeKms, client: KmsClient, key_id: str) -> None:
    data = b"x" * 100_000  # far beyond Encrypt's 4096-byte limit
    blob = client.envelope_encrypt(key_id, data, {"file": "a.bin"})

    assert client.envelope_decrypt(blob, {"file": "a.bin"}) == data
    (gdk,) = fake.calls_of("GenerateDataKey")
    assert gdk.key_spec == res.DATA_KEY_SPEC_AES_256
    assert dict(gdk.encryption_context) == {"file": "a.bin"}
    # Decrypt was asked to unwrap exactly the stored wrapped key.
    (dec,) = fake.calls_of("Decrypt")
    assert dec.ciphertext_blob == Envelope.parse(blob).wrapped_key


def test_layout_is_as_documented(fake: FakeKms, client: KmsClient, key_id: str) -> None:
    blob = client.envelope_encrypt(key_id, b"hello")
    assert blob[:5] == MAGIC == b"KMSE1"
    (wrapped_len,) = struct.unpack(">H", blob[5:7])
    wrapped = blob[7 : 7 + wrapped_len]
    nonce = blob[7 + wrapped_len : 7 + wrapped_len + NONCE_SIZE]
    sealed = blob[7 + wrapped_len + NONCE_SIZE :]
    assert len(sealed) == len(b"hello") + 16
    # Decrypt independently of the client: AES-256-GCM, AAD = magic.
    data_key = client.decrypt(wrapped).plaintext
    assert len(data_key) == 32
    assert AESGCM(data_key).decrypt(nonce, sealed, b"KMSE1") == b"hello"


def test_each_blob_uses_a_fresh_data_key_and_nonce(client: KmsClient, key_id: str) -> None:
    one = Envelope.parse(client.envelope_encrypt(key_id, b"same"))
    two = Envelope.parse(client.envelope_encrypt(key_id, b"same"))
    assert one.wrapped_key != two.wrapped_key
    assert one.nonce != two.nonce


def test_wrong_context_is_refused_by_kms(client: KmsClient, key_id: str) -> None:
    blob = client.envelope_encrypt(key_id, b"data", {"tenant": "a"})
    with pytest.raises(InvalidCiphertextException):
        client.envelope_decrypt(blob, {"tenant": "b"})


def test_tampered_ciphertext_fails_authentication(client: KmsClient, key_id: str) -> None:
    blob = bytearray(client.envelope_encrypt(key_id, b"data"))
    blob[-1] ^= 1
    with pytest.raises(InvalidEnvelopeError, match="authentication"):
        client.envelope_decrypt(bytes(blob))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"KMSE2" + b"\x00" * 40,
        b"KMSE1",
        b"KMSE1\x00",
        b"KMSE1\x00\x00" + b"\x00" * 40,
        b"KMSE1\x00\x10" + b"w" * 16 + b"n" * 12 + b"short",
    ],
    ids=["empty", "bad-magic", "no-length", "half-length", "zero-length-key", "short-tag"],
)
def test_malformed_blobs_are_rejected_before_any_call(
    blob: bytes, fake: FakeKms, client: KmsClient
) -> None:
    with pytest.raises(InvalidEnvelopeError):
        client.envelope_decrypt(blob)
    assert fake.calls == []


def test_envelope_serialisation_round_trip() -> None:
    env = Envelope(wrapped_key=b"w" * 300, nonce=b"n" * 12, ciphertext=b"c" * 17)
    assert Envelope.parse(env.to_bytes()) == env
    with pytest.raises(ValueError):
        Envelope(wrapped_key=b"", nonce=b"n" * 12, ciphertext=b"c" * 16).to_bytes()
    with pytest.raises(ValueError):
        Envelope(wrapped_key=b"w", nonce=b"n" * 11, ciphertext=b"c" * 16).to_bytes()
