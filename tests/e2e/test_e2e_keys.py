"""End-to-end: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, Enable/DisableKey,
Schedule/CancelKeyDeletion and the AWS key-state table, over a real kmsd process."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res
from test_e2e_errors import (
    ACCOUNT,
    DAY,
    KEY_ARN,
    MATERIAL_ID,
    assert_kms_error,
    assert_near,
    new_key,
)

from kmsd_process import KmsdProcess

Code = grpc.StatusCode
Stub = pb_grpc.KeyManagementServiceStub


def _describe(stub: Stub, key_ref: str) -> res.KeyMetadata:
    return stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_ref)).key_metadata


# ---- CreateKey ------------------------------------------------------------------------


def test_create_key_defaults(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    out = stub.CreateKey(pb.CreateKeyRequest())
    key = out.key_metadata
    assert out.commit_index > 0
    match = KEY_ARN.match(key.arn)
    assert match is not None, key.arn
    assert match.group(1) == key.key_id
    assert str(uuid.UUID(key.key_id)) == key.key_id
    assert key.aws_account_id == ACCOUNT
    assert key.enabled is True
    assert key.key_state == res.KEY_STATE_ENABLED
    assert key.key_spec == res.KEY_SPEC_SYMMETRIC_DEFAULT
    assert key.key_usage == res.KEY_USAGE_ENCRYPT_DECRYPT
    assert key.origin == res.ORIGIN_AWS_KMS
    assert key.key_manager == res.KEY_MANAGER_CUSTOMER
    assert list(key.encryption_algorithms) == [res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT]
    assert key.multi_region is False
    assert key.description == ""
    assert MATERIAL_ID.match(key.current_key_material_id), key.current_key_material_id
    assert not key.HasField("deletion_date")
    assert key.pending_deletion_window_in_days == 0
    assert_near(key.creation_date, time.time())
    # DescribeKey shows exactly what CreateKey returned.
    assert _describe(stub, key.key_id) == key


def test_create_key_explicit_symmetric_options(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = stub.CreateKey(
        pb.CreateKeyRequest(
            description="explicit",
            key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
            key_usage=res.KEY_USAGE_ENCRYPT_DECRYPT,
            origin=res.ORIGIN_AWS_KMS,
        )
    ).key_metadata
    assert key.description == "explicit"
    assert key.key_spec == res.KEY_SPEC_SYMMETRIC_DEFAULT


def test_two_keys_have_distinct_ids_and_material(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    a, b = new_key(stub), new_key(stub)
    assert a.key_id != b.key_id
    assert a.current_key_material_id != b.current_key_material_id


@pytest.mark.parametrize(
    "spec",
    [
        res.KEY_SPEC_RSA_2048,
        res.KEY_SPEC_RSA_4096,
        res.KEY_SPEC_ECC_NIST_P256,
        res.KEY_SPEC_ECC_SECG_P256K1,
        res.KEY_SPEC_HMAC_256,
        res.KEY_SPEC_SM2,
    ],
)
def test_unsupported_key_specs_are_refused(kmsd: KmsdProcess, spec: int) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(key_spec=spec)),
        Code.INVALID_ARGUMENT,
        "UnsupportedOperationException",
    )
    # The deprecated synonym works as key_spec does.
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(customer_master_key_spec=spec)),
        Code.INVALID_ARGUMENT,
        "UnsupportedOperationException",
    )


def test_customer_master_key_spec_is_a_synonym_of_key_spec(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = stub.CreateKey(
        pb.CreateKeyRequest(customer_master_key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT)
    ).key_metadata
    assert key.key_spec == res.KEY_SPEC_SYMMETRIC_DEFAULT
    both = pb.CreateKeyRequest(
        key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
        customer_master_key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
    )
    assert stub.CreateKey(both).key_metadata.key_spec == res.KEY_SPEC_SYMMETRIC_DEFAULT
    assert_kms_error(
        lambda: stub.CreateKey(
            pb.CreateKeyRequest(
                key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
                customer_master_key_spec=res.KEY_SPEC_RSA_2048,
            )
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="customer_master_key_spec",
    )


def test_symmetric_key_with_another_usage_is_invalid(kmsd: KmsdProcess) -> None:
    # AWS: KeyUsage SIGN_VERIFY is not compatible with KeySpec SYMMETRIC_DEFAULT.
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(key_usage=res.KEY_USAGE_SIGN_VERIFY)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="key_usage",
    )


def test_description_limits(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    longest = "d" * 8192
    assert new_key(stub, longest).description == longest
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(description="d" * 8193)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="description",
    )
    key = new_key(stub, "before")
    stub.UpdateKeyDescription(pb.UpdateKeyDescriptionRequest(key_id=key.arn, description="after"))
    assert _describe(stub, key.key_id).description == "after"
    assert_kms_error(
        lambda: stub.UpdateKeyDescription(
            pb.UpdateKeyDescriptionRequest(key_id=key.key_id, description="d" * 8193)
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="description",
    )
    assert _describe(stub, key.key_id).description == "after"


def test_create_key_with_tags(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    tags = [res.Tag(tag_key="env", tag_value="prod"), res.Tag(tag_key="cost", tag_value="")]
    key = stub.CreateKey(pb.CreateKeyRequest(tags=tags)).key_metadata
    listed = stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key.key_id)).tags
    assert {(t.tag_key, t.tag_value) for t in listed} == {("env", "prod"), ("cost", "")}


@pytest.mark.parametrize(
    ("tag", "field"),
    [
        (res.Tag(tag_key="aws:reserved", tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="", tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="k" * 129, tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="k", tag_value="v" * 257), "tags.tag_value"),
    ],
)
def test_create_key_refuses_bad_tags(kmsd: KmsdProcess, tag: res.Tag, field: str) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(tags=[tag])),
        Code.INVALID_ARGUMENT,
        "TagException",
        field=field,
    )


def test_create_key_refuses_duplicate_and_too_many_tags(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    twice = [res.Tag(tag_key="k", tag_value="1"), res.Tag(tag_key="k", tag_value="2")]
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(tags=twice)),
        Code.INVALID_ARGUMENT,
        "TagException",
        field="tags.tag_key",
    )
    fifty = [res.Tag(tag_key=f"k{n:02d}", tag_value="v") for n in range(50)]
    key = stub.CreateKey(pb.CreateKeyRequest(tags=fifty)).key_metadata
    listed = stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key.key_id))
    assert len(listed.tags) == 50
    fifty_one = [*fifty, res.Tag(tag_key="k50", tag_value="v")]
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(tags=fifty_one)),
        Code.RESOURCE_EXHAUSTED,
        "LimitExceededException",
    )


# ---- DescribeKey ----------------------------------------------------------------------


def test_describe_key_by_every_identifier(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub, "describe me")
    stub.CreateAlias(pb.CreateAliasRequest(alias_name="alias/describe-me", target_key_id=key.arn))
    alias_arn = key.arn.replace(f"key/{key.key_id}", "alias/describe-me")
    for key_ref in (key.key_id, key.arn, "alias/describe-me", alias_arn):
        assert _describe(stub, key_ref) == key, key_ref


# ---- ListKeys -------------------------------------------------------------------------


def test_list_keys_pages_with_limit_and_marker(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    created = {new_key(stub).key_id for _ in range(7)}
    seen: list[str] = []
    marker = ""
    pages = 0
    while True:
        out = stub.ListKeys(pb.ListKeysRequest(limit=3, marker=marker))
        pages += 1
        assert 1 <= len(out.keys) <= 3
        for entry in out.keys:
            assert entry.key_arn.endswith(f":key/{entry.key_id}")
            assert KEY_ARN.match(entry.key_arn)
        seen.extend(entry.key_id for entry in out.keys)
        assert out.truncated == bool(out.next_marker)
        if not out.truncated:
            break
        assert len(out.keys) == 3
        marker = out.next_marker
    assert len(seen) == len(set(seen)), "a key was listed twice"
    assert created <= set(seen)
    assert pages >= 3
    # One page with the default limit holds them all (fewer than 100 keys here).
    everything = stub.ListKeys(pb.ListKeysRequest())
    assert not everything.truncated and everything.next_marker == ""
    assert {k.key_id for k in everything.keys} == set(seen)


def test_list_keys_includes_keys_in_every_state(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    disabled, pending = new_key(stub), new_key(stub)
    stub.DisableKey(pb.DisableKeyRequest(key_id=disabled.key_id))
    stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=pending.key_id))
    listed = {k.key_id for k in stub.ListKeys(pb.ListKeysRequest(limit=1000)).keys}
    assert {disabled.key_id, pending.key_id} <= listed


@pytest.mark.parametrize("marker", ["garbage", "bm90LWEtbWFya2Vy", "!!!"])
def test_list_keys_refuses_a_bad_marker(kmsd: KmsdProcess, marker: str) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.ListKeys(pb.ListKeysRequest(marker=marker)),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
        field="marker",
    )


def test_list_keys_refuses_a_marker_of_another_listing(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    for n in range(3):
        stub.CreateAlias(pb.CreateAliasRequest(alias_name=f"alias/m{n}", target_key_id=key.key_id))
    aliases_marker = stub.ListAliases(pb.ListAliasesRequest(limit=1)).next_marker
    assert aliases_marker
    assert_kms_error(
        lambda: stub.ListKeys(pb.ListKeysRequest(marker=aliases_marker)),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
        field="marker",
    )


@pytest.mark.parametrize("limit", [-1, 1001])
def test_list_keys_limit_out_of_range(kmsd: KmsdProcess, limit: int) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.ListKeys(pb.ListKeysRequest(limit=limit)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="limit",
    )


def test_list_keys_limit_bounds_are_accepted(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    new_key(stub)
    new_key(stub)
    one = stub.ListKeys(pb.ListKeysRequest(limit=1))
    assert len(one.keys) == 1 and one.truncated
    assert not stub.ListKeys(pb.ListKeysRequest(limit=1000)).truncated


# ---- Enable / Disable -----------------------------------------------------------------


def _crypto_calls(stub: Stub, key_id: str, blob: bytes, other: str) -> dict[str, object]:
    return {
        "Encrypt": lambda: stub.Encrypt(pb.EncryptRequest(key_id=key_id, plaintext=b"x")),
        "Decrypt": lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)),
        "GenerateDataKey": lambda: stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(key_id=key_id, key_spec=res.DATA_KEY_SPEC_AES_256)
        ),
        "GenerateDataKeyWithoutPlaintext": lambda: stub.GenerateDataKeyWithoutPlaintext(
            pb.GenerateDataKeyWithoutPlaintextRequest(
                key_id=key_id, key_spec=res.DATA_KEY_SPEC_AES_256
            )
        ),
        "ReEncrypt from": lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(ciphertext_blob=blob, destination_key_id=other)
        ),
        "ReEncrypt to": lambda: stub.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=stub.Encrypt(
                    pb.EncryptRequest(key_id=other, plaintext=b"x")
                ).ciphertext_blob,
                destination_key_id=key_id,
            )
        ),
    }


def test_disabled_key_refuses_cryptographic_use(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key, other = new_key(stub), new_key(stub)
    blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"kept")).ciphertext_blob
    out = stub.DisableKey(pb.DisableKeyRequest(key_id=key.arn))
    assert out.commit_index > 0
    described = _describe(stub, key.key_id)
    assert described.key_state == res.KEY_STATE_DISABLED and described.enabled is False
    for name, call in _crypto_calls(stub, key.key_id, blob, other.key_id).items():
        seen = assert_kms_error(call, Code.FAILED_PRECONDITION, "DisabledException")  # type: ignore[arg-type]
        assert seen.message, name
    # Disabling again changes nothing; enabling restores every use, old ciphertexts included.
    stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id))
    stub.EnableKey(pb.EnableKeyRequest(key_id=key.key_id))
    stub.EnableKey(pb.EnableKeyRequest(key_id=key.key_id))
    assert _describe(stub, key.key_id).key_state == res.KEY_STATE_ENABLED
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"kept"


def test_disabled_key_can_still_be_managed(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id))
    stub.UpdateKeyDescription(pb.UpdateKeyDescriptionRequest(key_id=key.key_id, description="x"))
    stub.TagResource(pb.TagResourceRequest(key_id=key.key_id, tags=[res.Tag(tag_key="t")]))
    stub.CreateAlias(pb.CreateAliasRequest(alias_name="alias/of-disabled", target_key_id=key.arn))
    stub.GetKeyRotationStatus(pb.GetKeyRotationStatusRequest(key_id=key.key_id))
    assert _describe(stub, "alias/of-disabled").key_state == res.KEY_STATE_DISABLED


def test_enable_disable_unknown_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    missing = str(uuid.uuid4())
    assert_kms_error(
        lambda: stub.EnableKey(pb.EnableKeyRequest(key_id=missing)),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert_kms_error(
        lambda: stub.DisableKey(pb.DisableKeyRequest(key_id=missing)),
        Code.NOT_FOUND,
        "NotFoundException",
    )


# ---- ScheduleKeyDeletion / CancelKeyDeletion ------------------------------------------


def test_schedule_key_deletion_defaults_to_30_days(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    out = stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=key.key_id))
    now = time.time()
    assert out.commit_index > 0
    assert out.key_id == key.arn
    assert out.key_state == res.KEY_STATE_PENDING_DELETION
    assert out.pending_window_in_days == 30
    assert_near(out.deletion_date, now + 30 * DAY)
    described = _describe(stub, key.key_id)
    assert described.key_state == res.KEY_STATE_PENDING_DELETION
    assert described.enabled is False
    assert described.pending_deletion_window_in_days == 30
    assert described.deletion_date == out.deletion_date


@pytest.mark.parametrize("window", [6, 31, -1, 365])
def test_pending_window_out_of_range(kmsd: KmsdProcess, window: int) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.ScheduleKeyDeletion(
            pb.ScheduleKeyDeletionRequest(key_id=key.key_id, pending_window_in_days=window)
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="pending_window_in_days",
    )
    assert _describe(stub, key.key_id).key_state == res.KEY_STATE_ENABLED


@pytest.mark.parametrize("window", [7, 30])
def test_pending_window_bounds_are_accepted(kmsd: KmsdProcess, window: int) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    out = stub.ScheduleKeyDeletion(
        pb.ScheduleKeyDeletionRequest(key_id=key.arn, pending_window_in_days=window)
    )
    assert out.pending_window_in_days == window
    assert_near(out.deletion_date, time.time() + window * DAY)
    assert _describe(stub, key.key_id).pending_deletion_window_in_days == window


def test_pending_deletion_key_state_table(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key, other = new_key(stub), new_key(stub)
    blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"x")).ciphertext_blob
    stub.ScheduleKeyDeletion(
        pb.ScheduleKeyDeletionRequest(key_id=key.key_id, pending_window_in_days=7)
    )
    for call in _crypto_calls(stub, key.key_id, blob, other.key_id).values():
        assert_kms_error(call, Code.FAILED_PRECONDITION, "KMSInvalidStateException")  # type: ignore[arg-type]
    invalid_state = [
        lambda: stub.EnableKey(pb.EnableKeyRequest(key_id=key.key_id)),
        lambda: stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id)),
        lambda: stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=key.key_id)),
        lambda: stub.UpdateKeyDescription(
            pb.UpdateKeyDescriptionRequest(key_id=key.key_id, description="no")
        ),
        lambda: stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id)),
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id)),
        lambda: stub.TagResource(
            pb.TagResourceRequest(key_id=key.key_id, tags=[res.Tag(tag_key="t")])
        ),
    ]
    for call in invalid_state:
        assert_kms_error(call, Code.FAILED_PRECONDITION, "KMSInvalidStateException")
    # Reads work in every state.
    assert _describe(stub, key.key_id).key_state == res.KEY_STATE_PENDING_DELETION
    stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key.key_id))
    stub.GetKeyRotationStatus(pb.GetKeyRotationStatusRequest(key_id=key.key_id))


def test_cancel_key_deletion_leaves_the_key_disabled(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"x")).ciphertext_blob
    stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=key.key_id))
    out = stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=key.arn))
    assert out.key_id == key.arn and out.commit_index > 0
    described = _describe(stub, key.key_id)
    assert described.key_state == res.KEY_STATE_DISABLED
    assert not described.HasField("deletion_date")
    assert described.pending_deletion_window_in_days == 0
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)),
        Code.FAILED_PRECONDITION,
        "DisabledException",
    )
    # Not pending deletion any more: cancelling again is an invalid state.
    assert_kms_error(
        lambda: stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=key.key_id)),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    stub.EnableKey(pb.EnableKeyRequest(key_id=key.key_id))
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"x"


def test_cancel_key_deletion_of_an_enabled_key_is_invalid_state(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=key.key_id)),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    assert _describe(stub, key.key_id).key_state == res.KEY_STATE_ENABLED


def test_disabled_key_can_be_scheduled_for_deletion(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id))
    out = stub.ScheduleKeyDeletion(
        pb.ScheduleKeyDeletionRequest(key_id=key.key_id, pending_window_in_days=7)
    )
    assert out.key_state == res.KEY_STATE_PENDING_DELETION
    stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=key.key_id))
    assert _describe(stub, key.key_id).key_state == res.KEY_STATE_DISABLED


def test_schedule_and_cancel_unknown_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    missing = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{uuid.uuid4()}"
    assert_kms_error(
        lambda: stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=missing)),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert_kms_error(
        lambda: stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=missing)),
        Code.NOT_FOUND,
        "NotFoundException",
    )
