"""End-to-end: the error model (google.rpc.Status + ErrorInfo + BadRequest), identifier
resolution errors, idempotency by request_id, commit indexes, health and reflection.

Also home of the helpers the other e2e modules import (`assert_kms_error`, `new_key`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from kmsd_process import KmsdProcess

REGION = "us-east-1"
ACCOUNT = "111122223333"
ARN_PREFIX = f"arn:aws:kms:{REGION}:{ACCOUNT}:"
KEY_ARN = re.compile(rf"^arn:aws:kms:{REGION}:{ACCOUNT}:key/([0-9a-f-]{{36}})$")
MATERIAL_ID = re.compile(r"^[0-9a-f]{64}$")
DAY = 86_400

# The ErrorInfo reason kmsd sends with each AWS exception (DESIGN.md §2: UPPER_SNAKE_CASE).
REASONS = {
    "NotFoundException": "NOT_FOUND",
    "AlreadyExistsException": "ALREADY_EXISTS",
    "ValidationException": "VALIDATION_FAILED",
    "InvalidAliasNameException": "INVALID_ALIAS_NAME",
    "InvalidArnException": "INVALID_ARN",
    "InvalidMarkerException": "INVALID_MARKER",
    "TagException": "TAG_INVALID",
    "InvalidCiphertextException": "INVALID_CIPHERTEXT",
    "IncorrectKeyException": "INCORRECT_KEY",
    "InvalidKeyUsageException": "INVALID_KEY_USAGE",
    "UnsupportedOperationException": "UNSUPPORTED_OPERATION",
    "DisabledException": "KEY_DISABLED",
    "KMSInvalidStateException": "KMS_INVALID_STATE",
    "DryRunOperationException": "DRY_RUN_OPERATION",
    "ConflictException": "CONFLICT",
    "LimitExceededException": "LIMIT_EXCEEDED",
    "MalformedPolicyDocumentException": "MALFORMED_POLICY_DOCUMENT",
    "InvalidGrantTokenException": "INVALID_GRANT_TOKEN",
    "InvalidGrantIdException": "INVALID_GRANT_ID",
    "AccessDeniedException": "ACCESS_DENIED",
}
# Exceptions that are validation failures and so carry BadRequest field violations.
VALIDATION_FAMILY = {
    "ValidationException",
    "InvalidAliasNameException",
    "InvalidArnException",
    "InvalidMarkerException",
    "TagException",
    "MalformedPolicyDocumentException",
    "InvalidGrantTokenException",
    "InvalidGrantIdException",
}

Code = grpc.StatusCode


@dataclass(frozen=True)
class KmsErrorSeen:
    """What a failed call carried, for further assertions."""

    code: grpc.StatusCode
    message: str
    reason: str
    aws_exception: str
    fields: list[str]


def assert_kms_error(
    call: Callable[[], object],
    code: grpc.StatusCode,
    aws_exception: str,
    field: str | None = None,
) -> KmsErrorSeen:
    """Runs `call`, which must fail with `code` and a google.rpc.Status whose single
    ErrorInfo (domain "kmsd") names `aws_exception` and its reason; for validation errors,
    a BadRequest must name `field` (when given) as the one violated field."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == code, f"{error.code()} {error.details()}"
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == code.value[0]
    assert status.message == error.details()
    infos: list[error_details_pb2.ErrorInfo] = []
    bad_requests: list[error_details_pb2.BadRequest] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            bad_requests.append(bad)
    assert len(infos) == 1, status
    info = infos[0]
    assert info.domain == "kmsd"
    assert info.metadata["aws_exception"] == aws_exception, f"{info} {status.message}"
    assert info.reason == REASONS[aws_exception]
    fields = [v.field for bad in bad_requests for v in bad.field_violations]
    if aws_exception in VALIDATION_FAMILY:
        assert len(bad_requests) == 1 and fields, status
        assert all(v.description for v in bad_requests[0].field_violations)
    else:
        assert not bad_requests, status
    if field is not None:
        assert fields == [field], f"{fields} {status.message}"
    return KmsErrorSeen(code, status.message, info.reason, aws_exception, fields)


def new_key(stub: pb_grpc.KeyManagementServiceStub, description: str = "") -> res.KeyMetadata:
    """A fresh Enabled symmetric key."""
    return stub.CreateKey(pb.CreateKeyRequest(description=description)).key_metadata


def assert_near(stamp: Timestamp, expected_epoch_seconds: float, slack: float = 120.0) -> None:
    """A protobuf Timestamp within `slack` seconds of `expected_epoch_seconds`."""
    assert stamp.seconds > 0
    assert abs(stamp.seconds + stamp.nanos / 1e9 - expected_epoch_seconds) <= slack


def all_keys(stub: pb_grpc.KeyManagementServiceStub) -> list[str]:
    ids: list[str] = []
    marker = ""
    while True:
        out = stub.ListKeys(pb.ListKeysRequest(limit=1000, marker=marker))
        ids.extend(k.key_id for k in out.keys)
        if not out.truncated:
            return ids
        marker = out.next_marker


# ---- the error model ------------------------------------------------------------------


def test_not_found_carries_error_info_and_no_bad_request(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    missing = str(uuid.uuid4())
    seen = assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id=missing)),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert missing in seen.message


def test_validation_error_names_the_field(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id="")),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="key_id",
    )
    assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id="k" * 2049)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="key_id",
    )
    assert_kms_error(
        lambda: stub.Encrypt(pb.EncryptRequest(plaintext=b"x")),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="key_id",
    )


def test_request_id_longer_than_128_is_refused(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(request_id="r" * 129)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="request_id",
    )
    key = stub.CreateKey(pb.CreateKeyRequest(request_id="r" * 128)).key_metadata
    assert key.key_state == res.KEY_STATE_ENABLED


@pytest.mark.parametrize(
    "key_ref",
    [
        str(uuid.uuid4()),
        "not-a-key-id",
        "alias/does-not-exist",
        f"{ARN_PREFIX}key/{uuid.uuid4()}",
        f"{ARN_PREFIX}alias/does-not-exist",
    ],
)
def test_unknown_identifiers_are_not_found(kmsd: KmsdProcess, key_ref: str) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_ref)),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert_kms_error(
        lambda: stub.Encrypt(pb.EncryptRequest(key_id=key_ref, plaintext=b"x")),
        Code.NOT_FOUND,
        "NotFoundException",
    )


def test_arn_of_another_account_or_region_names_no_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    for arn in (
        f"arn:aws:kms:{REGION}:444455556666:key/{key.key_id}",
        f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/{key.key_id}",
    ):
        assert_kms_error(
            lambda arn=arn: stub.DescribeKey(pb.DescribeKeyRequest(key_id=arn)),
            Code.NOT_FOUND,
            "NotFoundException",
        )


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:s3:::my-bucket",
        "arn:aws:kms",
        f"{ARN_PREFIX}bucket/1234",
        f"arn:aws:iam::{ACCOUNT}:user/alice",
    ],
)
def test_malformed_arn_is_invalid_arn(kmsd: KmsdProcess, arn: str) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id=arn)),
        Code.INVALID_ARGUMENT,
        "InvalidArnException",
        field="key_id",
    )


def test_unsupported_options_are_refused_not_ignored(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    for request in (
        pb.CreateKeyRequest(multi_region=True),
        pb.CreateKeyRequest(custom_key_store_id="cks-1234567890abcdef0"),
        pb.CreateKeyRequest(xks_key_id="ext-key-1"),
        pb.CreateKeyRequest(origin=res.ORIGIN_EXTERNAL),
        pb.CreateKeyRequest(origin=res.ORIGIN_AWS_CLOUDHSM),
    ):
        assert_kms_error(
            lambda request=request: stub.CreateKey(request),
            Code.INVALID_ARGUMENT,
            "UnsupportedOperationException",
        )


def test_a_malformed_key_policy_names_what_is_wrong(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    seen = assert_kms_error(
        lambda: stub.CreateKey(
            pb.CreateKeyRequest(policy='{"Version":"2012-10-17","Statement":[]}')
        ),
        Code.INVALID_ARGUMENT,
        "MalformedPolicyDocumentException",
        field="policy",
    )
    assert "Statement: needs at least one statement" in seen.message
    key = stub.CreateKey(pb.CreateKeyRequest(bypass_policy_lockout_safety_check=True))
    policy = stub.GetKeyPolicy(pb.GetKeyPolicyRequest(key_id=key.key_metadata.key_id))
    assert policy.policy_name == "default" and '"kms:*"' in policy.policy


# ---- idempotency ----------------------------------------------------------------------


def test_create_key_retry_with_same_request_id_returns_the_same_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    request_id = str(uuid.uuid4())
    before = set(all_keys(stub))
    request = pb.CreateKeyRequest(
        description="idempotent",
        tags=[res.Tag(tag_key="team", tag_value="blue")],
        request_id=request_id,
    )
    first = stub.CreateKey(request)
    again = stub.CreateKey(request)
    assert again.key_metadata == first.key_metadata
    # The retry answers with the first response, its commit index included.
    assert again.commit_index == first.commit_index > 0
    created = set(all_keys(stub)) - before
    assert created == {first.key_metadata.key_id}
    # The key works, and its ciphertexts are the same key's whichever response was used.
    blob = stub.Encrypt(
        pb.EncryptRequest(key_id=again.key_metadata.key_id, plaintext=b"once")
    ).ciphertext_blob
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"once"


def test_same_request_id_with_other_parameters_is_refused(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    request_id = str(uuid.uuid4())
    before = set(all_keys(stub))
    stub.CreateKey(pb.CreateKeyRequest(description="first", request_id=request_id))
    assert_kms_error(
        lambda: stub.CreateKey(pb.CreateKeyRequest(description="second", request_id=request_id)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="request_id",
    )
    assert len(set(all_keys(stub)) - before) == 1
    # Another operation under the same request_id is a different request too.
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id, request_id=request_id)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="request_id",
    )
    assert stub.DescribeKey(pb.DescribeKeyRequest(key_id=key.key_id)).key_metadata.enabled


def test_same_request_id_on_another_operation_with_the_same_key_is_refused(
    kmsd: KmsdProcess,
) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    request_id = str(uuid.uuid4())
    stub.EnableKey(pb.EnableKeyRequest(key_id=key.key_id, request_id=request_id))
    assert_kms_error(
        lambda: stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id, request_id=request_id)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="request_id",
    )
    assert stub.DescribeKey(pb.DescribeKeyRequest(key_id=key.key_id)).key_metadata.enabled


def test_retried_state_changes_apply_once(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    tag_request = pb.TagResourceRequest(
        key_id=key.key_id, tags=[res.Tag(tag_key="a", tag_value="1")], request_id="tag-once"
    )
    stub.TagResource(tag_request)
    stub.TagResource(pb.TagResourceRequest(key_id=key.key_id, tags=[res.Tag(tag_key="a")]))
    # The retry of the first request must not put the old value back.
    stub.TagResource(tag_request)
    tags = stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key.key_id)).tags
    assert [(t.tag_key, t.tag_value) for t in tags] == [("a", "")]


# ---- commit indexes -------------------------------------------------------------------


def test_every_mutating_response_has_an_increasing_commit_index(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    first = stub.CreateKey(pb.CreateKeyRequest())
    other = new_key(stub)
    key_id = first.key_metadata.key_id
    indexes = [first.commit_index]
    calls: list[Callable[[], int]] = [
        lambda: (
            stub.UpdateKeyDescription(
                pb.UpdateKeyDescriptionRequest(key_id=key_id, description="d")
            ).commit_index
        ),
        lambda: stub.DisableKey(pb.DisableKeyRequest(key_id=key_id)).commit_index,
        lambda: stub.EnableKey(pb.EnableKeyRequest(key_id=key_id)).commit_index,
        lambda: (
            stub.CreateAlias(
                pb.CreateAliasRequest(alias_name="alias/commit-index", target_key_id=key_id)
            ).commit_index
        ),
        lambda: (
            stub.UpdateAlias(
                pb.UpdateAliasRequest(alias_name="alias/commit-index", target_key_id=other.key_id)
            ).commit_index
        ),
        lambda: (
            stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="alias/commit-index")).commit_index
        ),
        lambda: (
            stub.TagResource(
                pb.TagResourceRequest(key_id=key_id, tags=[res.Tag(tag_key="k", tag_value="v")])
            ).commit_index
        ),
        lambda: (
            stub.UntagResource(pb.UntagResourceRequest(key_id=key_id, tag_keys=["k"])).commit_index
        ),
        lambda: stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key_id)).commit_index,
        lambda: stub.DisableKeyRotation(pb.DisableKeyRotationRequest(key_id=key_id)).commit_index,
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key_id)).commit_index,
        lambda: (
            stub.ScheduleKeyDeletion(
                pb.ScheduleKeyDeletionRequest(key_id=key_id, pending_window_in_days=7)
            ).commit_index
        ),
        lambda: stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=key_id)).commit_index,
    ]
    for call in calls:
        indexes.append(call())
    assert indexes[0] > 0
    assert all(a < b for a, b in zip(indexes, indexes[1:], strict=False)), indexes


# ---- standard services ----------------------------------------------------------------


def test_health_check_reports_serving(kmsd: KmsdProcess) -> None:
    with kmsd.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kms.v1.KeyManagementService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == Code.NOT_FOUND


def test_server_reflection_lists_the_service(kmsd: KmsdProcess) -> None:
    with kmsd.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="kms.v1.KeyManagementService"
                ),
            ]
        )
        answers = list(reflection.ServerReflectionInfo(requests, timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "kms.v1.KeyManagementService" in names
    assert "grpc.health.v1.Health" in names
    assert answers[1].file_descriptor_response.file_descriptor_proto


def test_created_keys_are_timestamped_now(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_near(key.creation_date, time.time())


def test_undefined_enum_values_are_validation_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: stub.CreateKey(pb.CreateKeyRequest(key_spec=999)), "key_spec"),
        (
            lambda: stub.CreateKey(pb.CreateKeyRequest(customer_master_key_spec=999)),
            "customer_master_key_spec",
        ),
        (lambda: stub.CreateKey(pb.CreateKeyRequest(origin=999)), "origin"),
        (lambda: stub.CreateKey(pb.CreateKeyRequest(key_usage=999)), "key_usage"),
        (
            lambda: stub.Encrypt(
                pb.EncryptRequest(key_id=key.key_id, plaintext=b"x", encryption_algorithm=999)
            ),
            "encryption_algorithm",
        ),
        (
            lambda: stub.GenerateDataKey(pb.GenerateDataKeyRequest(key_id=key.key_id, key_spec=9)),
            "key_spec",
        ),
    ]
    for call, field in calls:
        assert_kms_error(call, Code.INVALID_ARGUMENT, "ValidationException", field=field)
