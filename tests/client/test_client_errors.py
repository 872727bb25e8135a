"""kms_client.errors: google.rpc.Status details on the wire -> the right exception and fields."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from kms_fake import FakeKms, make_status

from kms_client import errors
from kms_client.client import KmsClient
from kms_client.errors import (
    EXCEPTIONS_BY_AWS_NAME,
    InvalidAliasNameException,
    KmsClientError,
    KMSInternalException,
    KMSInvalidStateException,
    NotFoundException,
    ValidationException,
    error_from_status,
)

BRIEF_NAMES = [
    "NotFoundException",
    "AlreadyExistsException",
    "ValidationException",
    "InvalidAliasNameException",
    "InvalidArnException",
    "InvalidMarkerException",
    "TagException",
    "InvalidCiphertextException",
    "IncorrectKeyException",
    "InvalidKeyUsageException",
    "UnsupportedOperationException",
    "DisabledException",
    "KMSInvalidStateException",
    "DryRunOperationException",
    "ConflictException",
    "LimitExceededException",
    "AccessDeniedException",
    "KMSInternalException",
    "ThrottlingException",
    "MalformedPolicyDocumentException",
    "InvalidGrantTokenException",
    "InvalidGrantIdException",
]


def test_error_info_selects_class_and_fields(fake: FakeKms, client: KmsClient) -> None:
    fake.fail(
        "DisableKey",
        make_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            "Key is pending deletion.",
            reason="KMS_INVALID_STATE",
            aws_exception="KMSInvalidStateException",
        ),
    )
    with pytest.raises(KMSInvalidStateException) as info:
        client.disable_key("k1")
    err = info.value
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == "KMS_INVALID_STATE"
    assert err.aws_exception == "KMSInvalidStateException"
    assert err.message == "Key is pending deletion."
    assert err.field_violations == []
    assert err.retry_after is None
    assert str(err) == "KMSInvalidStateException: Key is pending deletion."
    # The gRPC error stays reachable for debugging.
    assert isinstance(err.__cause__, grpc.RpcError)


def test_bad_request_field_violations(fake: FakeKms, client: KmsClient) -> None:
    fake.fail(
        "CreateAlias",
        make_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "alias_name: must match alias/[a-zA-Z0-9/_-]+",
            reason="INVALID_ALIAS_NAME",
            aws_exception="InvalidAliasNameException",
            violations=(("alias_name", "must match alias/[a-zA-Z0-9/_-]+"),),
        ),
    )
    with pytest.raises(ValidationException) as info:
        client.create_alias("bad name", "k1")
    assert type(info.value) is InvalidAliasNameException
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations == [("alias_name", "must match alias/[a-zA-Z0-9/_-]+")]


def test_retry_info_and_leader_hint_are_exposed(
    fake: FakeKms, make_client: Callable[..., KmsClient]
) -> None:
    fake.fail_always(
        make_status(
            grpc.StatusCode.UNAVAILABLE,
            "no quorum",
            reason="UNAVAILABLE",
            aws_exception="KMSInternalException",
            retry_after=0.25,
            metadata={"leader_address": "10.9.9.9:7400"},
        )
    )
    client = make_client([fake.address], max_attempts=1)
    with pytest.raises(KMSInternalException) as info:
        client.describe_key("k1")
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.retry_after == pytest.approx(0.25)
    assert info.value.leader_address == "10.9.9.9:7400"


def test_unknown_aws_name_gives_base_class_and_keeps_the_name(
    fake: FakeKms, client: KmsClient
) -> None:
    fake.fail(
        "DescribeKey",
        make_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            "custom",
            reason="SOMETHING_NEW",
            aws_exception="BrandNewException",
        ),
    )
    with pytest.raises(KmsClientError) as info:
        client.describe_key("k1")
    assert type(info.value) is KmsClientError
    assert info.value.aws_exception == "BrandNewException"
    assert info.value.reason == "SOMETHING_NEW"


def test_no_details(fake: FakeKms, client: KmsClient) -> None:
    fake.fail("DescribeKey", make_status(grpc.StatusCode.NOT_FOUND, "plain"))
    with pytest.raises(KmsClientError) as info:
        client.describe_key("k1")
    # Without ErrorInfo the client does not guess an AWS exception from the code.
    assert type(info.value) is KmsClientError
    assert info.value.aws_exception == ""
    assert info.value.name == "NOT_FOUND"
    assert info.value.message == "plain"


def test_internal_without_details_is_kms_internal(fake: FakeKms, client: KmsClient) -> None:
    fake.fail("DescribeKey", make_status(grpc.StatusCode.INTERNAL, "boom"))
    with pytest.raises(KMSInternalException) as info:
        client.describe_key("k1")
    assert info.value.aws_exception == "KMSInternalException"


def test_plain_abort_without_status_details(fake: FakeKms, client: KmsClient) -> None:
    # A server (or proxy) that sends only a code and message, no status trailer.
    original = fake.do_DescribeKey

    def plain(request: object) -> object:
        raise _PlainAbort()

    fake.do_DescribeKey = plain  # type: ignore[method-assign, assignment]
    try:
        with pytest.raises(KmsClientError) as info:
            client.describe_key("k1")
    finally:
        fake.do_DescribeKey = original  # type: ignore[method-assign]
    assert info.value.code is grpc.StatusCode.UNKNOWN


class _PlainAbort(Exception):
    """An unexpected handler exception: gRPC reports it as UNKNOWN with no details."""


@pytest.mark.parametrize("name", BRIEF_NAMES)
def test_every_aws_exception_maps_to_its_class(name: str, fake: FakeKms, client: KmsClient) -> None:
    fake.fail(
        "DescribeKey",
        make_status(grpc.StatusCode.FAILED_PRECONDITION, "m", reason="R", aws_exception=name),
    )
    with pytest.raises(KmsClientError) as info:
        client.describe_key("k1")
    assert type(info.value).__name__ == name
    assert type(info.value) is EXCEPTIONS_BY_AWS_NAME[name]
    assert getattr(errors, name) is type(info.value)


def test_hierarchy_mirrors_server() -> None:
    for name in (
        "InvalidAliasNameException",
        "InvalidArnException",
        "InvalidMarkerException",
        "TagException",
        "MalformedPolicyDocumentException",
        "InvalidGrantTokenException",
        "InvalidGrantIdException",
    ):
        assert issubclass(EXCEPTIONS_BY_AWS_NAME[name], ValidationException)
    assert issubclass(NotFoundException, KmsClientError)
    assert not issubclass(NotFoundException, ValidationException)


def test_error_from_status_reads_details_directly() -> None:
    status = make_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "tags[0].tag_key: too long",
        reason="TAG_INVALID",
        aws_exception="TagException",
        violations=(("tags[0].tag_key", "too long"), ("tags[1].tag_value", "too long")),
    )
    err = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, status)
    assert type(err).__name__ == "TagException"
    assert err.field_violations == [
        ("tags[0].tag_key", "too long"),
        ("tags[1].tag_value", "too long"),
    ]
    assert err.metadata == {"aws_exception": "TagException"}


def test_error_from_status_ignores_unknown_detail_types() -> None:
    status = make_status(grpc.StatusCode.UNAVAILABLE, "down")
    status.details.add().Pack(error_details_pb2.DebugInfo(detail="stack"))
    err = error_from_status(grpc.StatusCode.UNAVAILABLE, status)
    assert type(err) is KMSInternalException
    assert err.message == "down"


def test_error_from_status_without_status_uses_fallback_message() -> None:
    err = error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, None, "Deadline Exceeded")
    assert type(err) is KmsClientError
    assert err.message == "Deadline Exceeded"
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_status_message_is_preferred() -> None:
    status = status_pb2.Status(code=5, message="from status")
    assert error_from_status(grpc.StatusCode.NOT_FOUND, status, "from call").message == (
        "from status"
    )
