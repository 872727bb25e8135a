"""End-to-end: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateRandom and dry runs, over a real kmsd process."""

from __future__ import annotations

import os

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res
from test_e2e_errors import MATERIAL_ID, assert_kms_error, new_key

from kmsd_process import KmsdProcess

Code = grpc.StatusCode
Stub = pb_grpc.KeyManagementServiceStub
SYMMETRIC = res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT
RSA_256 = res.ENCRYPTION_ALGORITHM_SPEC_RSAES_OAEP_SHA_256


@pytest.fixture(scope="module")
def key(kmsd: KmsdProcess) -> res.KeyMetadata:
    return new_key(kmsd.stub(), "crypto")


@pytest.fixture(scope="module")
def other_key(kmsd: KmsdProcess) -> res.KeyMetadata:
    return new_key(kmsd.stub(), "crypto other")


@pytest.fixture(scope="module")
def alias(kmsd: KmsdProcess, key: res.KeyMetadata) -> str:
    kmsd.stub().CreateAlias(pb.CreateAliasRequest(alias_name="alias/crypto", target_key_id=key.arn))
    return "alias/crypto"


def _encrypt(stub: Stub, key_id: str, plaintext: bytes, **context: str) -> bytes:
    return stub.Encrypt(
        pb.EncryptRequest(key_id=key_id, plaintext=plaintext, encryption_context=context)
    ).ciphertext_blob


# ---- Encrypt / Decrypt ----------------------------------------------------------------


def test_encrypt_decrypt_round_trip(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    out = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"hello"))
    assert out.key_id == key.arn
    assert out.encryption_algorithm == SYMMETRIC
    assert 1 <= len(out.ciphertext_blob) <= 6144
    assert b"hello" not in out.ciphertext_blob
    back = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob))
    assert back.plaintext == b"hello"
    assert back.key_id == key.arn
    assert back.encryption_algorithm == SYMMETRIC
    assert back.key_material_id == key.current_key_material_id
    assert MATERIAL_ID.match(back.key_material_id)


def test_encryption_is_randomised(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    assert _encrypt(stub, key.key_id, b"same") != _encrypt(stub, key.key_id, b"same")


@pytest.mark.parametrize("size", [1, 4096])
def test_plaintext_size_bounds_are_accepted(
    kmsd: KmsdProcess, key: res.KeyMetadata, size: int
) -> None:
    stub = kmsd.stub()
    plaintext = os.urandom(size)
    blob = _encrypt(stub, key.key_id, plaintext)
    assert len(blob) <= 6144
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == plaintext


@pytest.mark.parametrize("size", [0, 4097])
def test_plaintext_size_out_of_range(kmsd: KmsdProcess, key: res.KeyMetadata, size: int) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"p" * size)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="plaintext",
    )


@pytest.mark.parametrize("size", [0, 6145])
def test_ciphertext_size_out_of_range(kmsd: KmsdProcess, size: int) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=b"\x01" * size)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="ciphertext_blob",
    )
    assert_kms_error(
        lambda: stub.ReEncrypt(
            # Limits are checked before the (missing) destination key is looked up.
            pb.ReEncryptRequest(ciphertext_blob=b"\x01" * size, destination_key_id="alias/none")
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="ciphertext_blob",
    )


def test_encryption_context_must_match_exactly(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    context = {"tenant": "acme", "Purpose": "Invoices", "n": "1"}
    blob = _encrypt(stub, key.key_id, b"ctx", **context)
    reordered = dict(reversed(list(context.items())))
    for good in (context, reordered):
        out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context=good))
        assert out.plaintext == b"ctx"
    bad_contexts = [
        {},
        {"tenant": "acme", "Purpose": "Invoices"},
        {**context, "extra": "x"},
        {"tenant": "acme", "purpose": "Invoices", "n": "1"},  # key case differs
        {"tenant": "ACME", "Purpose": "Invoices", "n": "1"},  # value case differs
        {"tenant": "acme", "Purpose": "Invoices", "n": "2"},
    ]
    messages = set()
    for bad in bad_contexts:
        seen = assert_kms_error(
            lambda bad=bad: stub.Decrypt(
                pb.DecryptRequest(ciphertext_blob=blob, encryption_context=bad)
            ),
            Code.INVALID_ARGUMENT,
            "InvalidCiphertextException",
        )
        messages.add(seen.message)
    assert len(messages) == 1
    # No context at encryption means none may be given at decryption.
    plain = _encrypt(stub, key.key_id, b"none")
    assert_kms_error(
        lambda: stub.Decrypt(
            pb.DecryptRequest(ciphertext_blob=plain, encryption_context={"a": "b"})
        ),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )


def test_context_pairs_are_not_concatenated(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    # {"ab": "c"} and {"a": "bc"} must not be the same context.
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"x", ab="c")
    assert_kms_error(
        lambda: stub.Decrypt(
            pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"a": "bc"})
        ),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )


def test_decrypt_with_the_right_key_named_every_way(
    kmsd: KmsdProcess, key: res.KeyMetadata, alias: str
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"named")
    alias_arn = key.arn.replace(f"key/{key.key_id}", alias)
    for key_ref in (key.key_id, key.arn, alias, alias_arn):
        out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, key_id=key_ref))
        assert out.plaintext == b"named" and out.key_id == key.arn
    # Encrypting through the alias gives a blob bound to the key, not to the alias.
    via_alias = stub.Encrypt(pb.EncryptRequest(key_id=alias_arn, plaintext=b"a"))
    assert via_alias.key_id == key.arn
    out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=via_alias.ciphertext_blob))
    assert out.key_id == key.arn


def test_decrypt_with_another_key_named_is_incorrect_key(
    kmsd: KmsdProcess, key: res.KeyMetadata, other_key: res.KeyMetadata
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"mine")
    for key_ref in (other_key.key_id, other_key.arn):
        assert_kms_error(
            lambda key_ref=key_ref: stub.Decrypt(
                pb.DecryptRequest(ciphertext_blob=blob, key_id=key_ref)
            ),
            Code.INVALID_ARGUMENT,
            "IncorrectKeyException",
        )


def test_bad_ciphertexts_are_opaque(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"integrity", k="v")
    flipped = []
    for position in (0, 1, 17, 20, 21, 40, 48, 49, len(blob) // 2, len(blob) - 1):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        flipped.append(bytes(damaged))
    bad_blobs = [
        b"x",
        b"\x00" * 200,
        os.urandom(300),
        b"\x01" + os.urandom(120),
        blob[:-1],
        blob[:60],
        blob[:49],
        blob + b"\x00",
        *flipped,
    ]
    messages = set()
    for bad in bad_blobs:
        seen = assert_kms_error(
            lambda bad=bad: stub.Decrypt(
                pb.DecryptRequest(ciphertext_blob=bad, encryption_context={"k": "v"})
            ),
            Code.INVALID_ARGUMENT,
            "InvalidCiphertextException",
        )
        messages.add(seen.message)
    assert len(messages) == 1, messages
    # The untouched blob still decrypts.
    out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"k": "v"}))
    assert out.plaintext == b"integrity"


def test_asymmetric_encryption_algorithm_is_invalid_key_usage(
    kmsd: KmsdProcess, key: res.KeyMetadata
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"x")
    calls = [
        lambda: stub.Encrypt(
            pb.EncryptRequest(key_id=key.key_id, plaintext=b"x", encryption_algorithm=RSA_256)
        ),
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_algorithm=RSA_256)),
        lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=blob,
                destination_key_id=key.key_id,
                destination_encryption_algorithm=RSA_256,
            )
        ),
        lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=blob,
                destination_key_id=key.key_id,
                source_encryption_algorithm=RSA_256,
            )
        ),
    ]
    for call in calls:
        assert_kms_error(call, Code.INVALID_ARGUMENT, "InvalidKeyUsageException")
    # SYMMETRIC_DEFAULT given explicitly is fine.
    explicit = stub.Encrypt(
        pb.EncryptRequest(key_id=key.key_id, plaintext=b"x", encryption_algorithm=SYMMETRIC)
    )
    out = stub.Decrypt(
        pb.DecryptRequest(ciphertext_blob=explicit.ciphertext_blob, encryption_algorithm=SYMMETRIC)
    )
    assert out.plaintext == b"x"


def test_recipient_is_refused_not_ignored(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"x")
    recipient = pb.RecipientInfo(
        key_encryption_algorithm=pb.KEY_ENCRYPTION_MECHANISM_RSAES_OAEP_SHA_256,
        attestation_document=b"doc",
    )
    for call in (
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, recipient=recipient)),
        lambda: stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(
                key_id=key.key_id, key_spec=res.DATA_KEY_SPEC_AES_256, recipient=recipient
            )
        ),
        lambda: stub.GenerateRandom(
            pb.GenerateRandomRequest(number_of_bytes=8, recipient=recipient)
        ),
    ):
        assert_kms_error(call, Code.INVALID_ARGUMENT, "UnsupportedOperationException")


def test_grant_tokens_limits(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.Encrypt(
            pb.EncryptRequest(key_id=key.key_id, plaintext=b"x", grant_tokens=["t"] * 11)
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="grant_tokens",
    )


# ---- dry runs -------------------------------------------------------------------------


def test_dry_run_reports_success_without_doing_it(
    kmsd: KmsdProcess, key: res.KeyMetadata, other_key: res.KeyMetadata
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"dry")
    calls = [
        lambda: stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"x", dry_run=True)),
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, dry_run=True)),
        lambda: stub.Decrypt(
            pb.DecryptRequest(
                key_id=key.key_id,
                dry_run=True,
                dry_run_modifiers=[pb.DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT],
            )
        ),
        lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=blob, destination_key_id=other_key.key_id, dry_run=True
            )
        ),
        lambda: stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(
                key_id=key.key_id, key_spec=res.DATA_KEY_SPEC_AES_256, dry_run=True
            )
        ),
        lambda: stub.GenerateDataKeyWithoutPlaintext(
            pb.GenerateDataKeyWithoutPlaintextRequest(
                key_id=key.key_id, number_of_bytes=64, dry_run=True
            )
        ),
    ]
    for call in calls:
        assert_kms_error(call, Code.FAILED_PRECONDITION, "DryRunOperationException")


def test_dry_run_reports_the_error_it_would_have_returned(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    disabled = new_key(stub)
    blob = _encrypt(stub, disabled.key_id, b"x")
    stub.DisableKey(pb.DisableKeyRequest(key_id=disabled.key_id))
    assert_kms_error(
        lambda: stub.Encrypt(
            pb.EncryptRequest(key_id=disabled.key_id, plaintext=b"x", dry_run=True)
        ),
        Code.FAILED_PRECONDITION,
        "DisabledException",
    )
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, dry_run=True)),
        Code.FAILED_PRECONDITION,
        "DisabledException",
    )
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=b"\x01" * 80, dry_run=True)),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )
    assert_kms_error(
        lambda: stub.Decrypt(
            pb.DecryptRequest(
                dry_run=True, dry_run_modifiers=[pb.DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT]
            )
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="key_id",
    )


# ---- ReEncrypt ------------------------------------------------------------------------


def test_re_encrypt_between_keys_with_contexts(
    kmsd: KmsdProcess, key: res.KeyMetadata, other_key: res.KeyMetadata
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"move me", stage="source")
    out = stub.ReEncrypt(
        pb.ReEncryptRequest(
            ciphertext_blob=blob,
            source_encryption_context={"stage": "source"},
            source_key_id=key.key_id,
            destination_key_id=other_key.arn,
            destination_encryption_context={"stage": "destination"},
        )
    )
    assert out.source_key_id == key.arn
    assert out.key_id == other_key.arn
    assert out.source_encryption_algorithm == SYMMETRIC
    assert out.destination_encryption_algorithm == SYMMETRIC
    assert out.source_key_material_id == key.current_key_material_id
    assert out.destination_key_material_id == other_key.current_key_material_id
    back = stub.Decrypt(
        pb.DecryptRequest(
            ciphertext_blob=out.ciphertext_blob, encryption_context={"stage": "destination"}
        )
    )
    assert back.plaintext == b"move me" and back.key_id == other_key.arn
    assert_kms_error(
        lambda: stub.Decrypt(
            pb.DecryptRequest(
                ciphertext_blob=out.ciphertext_blob, encryption_context={"stage": "source"}
            )
        ),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )
    assert_kms_error(
        lambda: stub.Decrypt(
            pb.DecryptRequest(
                ciphertext_blob=out.ciphertext_blob,
                encryption_context={"stage": "destination"},
                key_id=key.key_id,
            )
        ),
        Code.INVALID_ARGUMENT,
        "IncorrectKeyException",
    )


def test_re_encrypt_checks_source_key_and_context(
    kmsd: KmsdProcess, key: res.KeyMetadata, other_key: res.KeyMetadata
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"x", a="1")
    assert_kms_error(
        lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=blob,
                source_encryption_context={"a": "1"},
                source_key_id=other_key.key_id,
                destination_key_id=other_key.key_id,
            )
        ),
        Code.INVALID_ARGUMENT,
        "IncorrectKeyException",
    )
    assert_kms_error(
        lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=blob,
                source_encryption_context={"a": "2"},
                destination_key_id=other_key.key_id,
            )
        ),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )
    assert_kms_error(
        lambda: stub.ReEncrypt(pb.ReEncryptRequest(ciphertext_blob=blob)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="destination_key_id",
    )


def test_re_encrypt_to_the_same_key_through_an_alias(
    kmsd: KmsdProcess, key: res.KeyMetadata, alias: str
) -> None:
    stub = kmsd.stub()
    blob = _encrypt(stub, key.key_id, b"same key")
    out = stub.ReEncrypt(
        pb.ReEncryptRequest(ciphertext_blob=blob, source_key_id=alias, destination_key_id=alias)
    )
    assert out.key_id == out.source_key_id == key.arn
    assert out.ciphertext_blob != blob
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob)).plaintext == (
        b"same key"
    )


# ---- GenerateDataKey / GenerateDataKeyWithoutPlaintext ---------------------------------


@pytest.mark.parametrize(
    ("spec", "size"), [(res.DATA_KEY_SPEC_AES_256, 32), (res.DATA_KEY_SPEC_AES_128, 16)]
)
def test_generate_data_key_by_spec(
    kmsd: KmsdProcess, key: res.KeyMetadata, spec: int, size: int
) -> None:
    stub = kmsd.stub()
    out = stub.GenerateDataKey(
        pb.GenerateDataKeyRequest(key_id=key.key_id, key_spec=spec, encryption_context={"f": "1"})
    )
    assert len(out.plaintext) == size
    assert out.key_id == key.arn
    assert out.key_material_id == key.current_key_material_id
    back = stub.Decrypt(
        pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob, encryption_context={"f": "1"})
    )
    assert back.plaintext == out.plaintext
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob)),
        Code.INVALID_ARGUMENT,
        "InvalidCiphertextException",
    )


@pytest.mark.parametrize("size", [1, 1024])
def test_generate_data_key_by_number_of_bytes(
    kmsd: KmsdProcess, key: res.KeyMetadata, size: int
) -> None:
    stub = kmsd.stub()
    out = stub.GenerateDataKey(pb.GenerateDataKeyRequest(key_id=key.key_id, number_of_bytes=size))
    assert len(out.plaintext) == size
    back = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob))
    assert back.plaintext == out.plaintext


def test_data_keys_are_fresh(kmsd: KmsdProcess, key: res.KeyMetadata) -> None:
    stub = kmsd.stub()
    request = pb.GenerateDataKeyRequest(key_id=key.key_id, key_spec=res.DATA_KEY_SPEC_AES_256)
    assert stub.GenerateDataKey(request).plaintext != stub.GenerateDataKey(request).plaintext


@pytest.mark.parametrize(
    ("number_of_bytes", "key_spec", "field"),
    [
        (0, 0, "key_spec"),  # neither
        (1025, 0, "number_of_bytes"),
        (-1, 0, "number_of_bytes"),
        (32, res.DATA_KEY_SPEC_AES_256, "number_of_bytes"),  # both
        (0, 99, "key_spec"),
    ],
)
def test_generate_data_key_length_errors(
    kmsd: KmsdProcess, key: res.KeyMetadata, number_of_bytes: int, key_spec: int, field: str
) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(
                key_id=key.key_id, number_of_bytes=number_of_bytes, key_spec=key_spec
            )
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field=field,
    )
    assert_kms_error(
        lambda: stub.GenerateDataKeyWithoutPlaintext(
            pb.GenerateDataKeyWithoutPlaintextRequest(
                key_id=key.key_id, number_of_bytes=number_of_bytes, key_spec=key_spec
            )
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field=field,
    )


def test_generate_data_key_without_plaintext(
    kmsd: KmsdProcess, key: res.KeyMetadata, alias: str
) -> None:
    stub = kmsd.stub()
    out = stub.GenerateDataKeyWithoutPlaintext(
        pb.GenerateDataKeyWithoutPlaintextRequest(
            key_id=alias, key_spec=res.DATA_KEY_SPEC_AES_128, encryption_context={"x": "y"}
        )
    )
    assert out.key_id == key.arn
    assert out.key_material_id == key.current_key_material_id
    back = stub.Decrypt(
        pb.DecryptRequest(ciphertext_blob=out.ciphertext_blob, encryption_context={"x": "y"})
    )
    assert len(back.plaintext) == 16
    by_bytes = stub.GenerateDataKeyWithoutPlaintext(
        pb.GenerateDataKeyWithoutPlaintextRequest(key_id=key.key_id, number_of_bytes=1024)
    )
    decrypted = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=by_bytes.ciphertext_blob))
    assert len(decrypted.plaintext) == 1024


# ---- GenerateRandom -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 32, 1024])
def test_generate_random(kmsd: KmsdProcess, size: int) -> None:
    stub = kmsd.stub()
    out = stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=size))
    assert len(out.plaintext) == size
    assert not out.ciphertext_for_recipient


def test_generate_random_is_random(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    draws = {
        stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=32)).plaintext
        for _ in range(4)
    }
    assert len(draws) == 4


@pytest.mark.parametrize("size", [0, -1, 1025])
def test_generate_random_out_of_range(kmsd: KmsdProcess, size: int) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=size)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="number_of_bytes",
    )


def test_generate_random_refuses_custom_key_stores(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.GenerateRandom(
            pb.GenerateRandomRequest(number_of_bytes=8, custom_key_store_id="cks-1")
        ),
        Code.INVALID_ARGUMENT,
        "UnsupportedOperationException",
    )
