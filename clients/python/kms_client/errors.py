"""Client-side exceptions: one class per AWS KMS exception, built from a gRPC error.

kmsd reports every failure as a canonical gRPC status code carrying a
`google.rpc.Status` whose details hold one `google.rpc.ErrorInfo` (reason,
domain "kmsd", metadata["aws_exception"]), plus `google.rpc.BadRequest` for
validation errors and `google.rpc.RetryInfo` for UNAVAILABLE. `from_rpc_error`
turns such an error into the `KmsClientError` subclass named after
`metadata["aws_exception"]`, so callers can write
`except NotFoundException:` exactly as with the AWS SDKs.

The tree mirrors the server's (`kmsd/errors.py`):

    KmsClientError
    ├── NotFoundException, AlreadyExistsException
    ├── ValidationException
    │   ├── InvalidAliasNameException, InvalidArnException
    │   ├── InvalidMarkerException, TagException
    │   ├── MalformedPolicyDocumentException
    │   └── InvalidGrantTokenException, InvalidGrantIdException
    ├── InvalidCiphertextException, IncorrectKeyException, InvalidKeyUsageException
    ├── UnsupportedOperationException
    ├── DisabledException, KMSInvalidStateException, DryRunOperationException
    ├── ConflictException, LimitExceededException, AccessDeniedException
    ├── KMSInternalException
    └── ThrottlingException
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

#: The ErrorInfo domain kmsd uses; details from other domains are still read.
KMSD_DOMAIN = "kmsd"
#: ErrorInfo metadata key naming the AWS exception.
AWS_EXCEPTION_KEY = "aws_exception"
#: ErrorInfo metadata key a follower may set to point at the current leader.
LEADER_ADDRESS_KEY = "leader_address"


class KmsClientError(Exception):
    """Any error kmsd (or the transport to it) reported for a call.

    Attributes:
        code: the canonical gRPC status code.
        reason: ErrorInfo reason (UPPER_SNAKE_CASE, e.g. ``KMS_INVALID_STATE``), or "".
        aws_exception: the AWS exception name from ErrorInfo, or "" when none was sent.
        message: the human-readable status message.
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.
        retry_after: the delay in seconds the server asked for (``RetryInfo``), or None.
        metadata: the whole ErrorInfo metadata map (includes ``aws_exception`` and,
            when a follower knows it, ``leader_address``).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        aws_exception: str = "",
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.aws_exception = aws_exception
        self.message = message
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def leader_address(self) -> str | None:
        """The leader's host:port when a follower told us, else None."""
        return self.metadata.get(LEADER_ADDRESS_KEY) or None

    @property
    def name(self) -> str:
        """The AWS exception name, or the gRPC code name when the server sent none."""
        return self.aws_exception or self.code.name

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )


class NotFoundException(KmsClientError):
    """The named key, alias or other resource does not exist (NOT_FOUND)."""


class AlreadyExistsException(KmsClientError):
    """A resource with that name exists already (ALREADY_EXISTS)."""


class ValidationException(KmsClientError):
    """A request field is missing, malformed or out of range; see `field_violations`."""


class InvalidAliasNameException(ValidationException):
    """An alias name breaks the AWS alias naming rules."""


class InvalidArnException(ValidationException):
    """A key id, ARN or alias is malformed."""


class InvalidMarkerException(ValidationException):
    """A paging marker was not issued by this service for this listing."""


class TagException(ValidationException):
    """A tag key or value breaks the tagging rules."""


class InvalidCiphertextException(KmsClientError):
    """The ciphertext could not be decrypted (deliberately opaque about why)."""


class IncorrectKeyException(KmsClientError):
    """The named key is not the key that encrypted the ciphertext."""


class InvalidKeyUsageException(KmsClientError):
    """The key's usage or spec does not allow this operation."""


class UnsupportedOperationException(KmsClientError):
    """The operation or option is not supported by kmsd (yet) or for this key."""


class InvalidGrantTokenException(ValidationException):
    """A grant token is malformed or not valid."""


class InvalidGrantIdException(ValidationException):
    """A grant id is malformed."""


class MalformedPolicyDocumentException(ValidationException):
    """A key policy document is not valid; the message names the statement and element."""


class DisabledException(KmsClientError):
    """The key is disabled (FAILED_PRECONDITION)."""


class KMSInvalidStateException(KmsClientError):
    """The key's state does not allow this operation (FAILED_PRECONDITION)."""


class DryRunOperationException(KmsClientError):
    """A dry run that would have succeeded."""


class ConflictException(KmsClientError):
    """The request conflicts with work in progress on the same resource (ABORTED)."""


class LimitExceededException(KmsClientError):
    """A per-resource limit would be exceeded (RESOURCE_EXHAUSTED)."""


class AccessDeniedException(KmsClientError):
    """The caller may not perform this operation (PERMISSION_DENIED)."""


class KMSInternalException(KmsClientError):
    """An internal error, or the cluster has no quorum/leader now (INTERNAL, UNAVAILABLE)."""


class ThrottlingException(KmsClientError):
    """The request rate is too high; slow down and retry."""


def _registry() -> dict[str, type[KmsClientError]]:
    found: dict[str, type[KmsClientError]] = {}
    pending: list[type[KmsClientError]] = [KmsClientError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            # Only this module's classes: a user's subclass must not hijack a name.
            if sub.__module__ == __name__:
                found[sub.__name__] = sub
                pending.append(sub)
    return found


#: AWS exception name -> class, for every exception this module defines.
EXCEPTIONS_BY_AWS_NAME: Mapping[str, type[KmsClientError]] = _registry()

# Codes whose detail-less errors are the service's (or transport's) own failure.
_INTERNAL_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})


def error_from_status(
    code: grpc.StatusCode, status: status_pb2.Status | None, message: str = ""
) -> KmsClientError:
    """Builds the exception for `code` and a decoded `google.rpc.Status` (None if absent)."""
    reason = ""
    aws_exception = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                # The first ErrorInfo wins; kmsd sends exactly one.
                if not reason and not aws_exception:
                    reason = info.reason
                    metadata = dict(info.metadata)
                    aws_exception = metadata.get(AWS_EXCEPTION_KEY, "")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                if retry.HasField("retry_delay"):
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    cls = EXCEPTIONS_BY_AWS_NAME.get(aws_exception)
    if cls is None:
        cls = KMSInternalException if code in _INTERNAL_CODES else KmsClientError
    return cls(
        message,
        code=code,
        reason=reason,
        aws_exception=aws_exception or (cls.__name__ if cls is not KmsClientError else ""),
        field_violations=violations,
        retry_after=retry_after,
        metadata=metadata,
    )


def from_rpc_error(err: grpc.RpcError) -> KmsClientError:
    """Converts a `grpc.RpcError` raised by a call into the matching `KmsClientError`."""
    if not isinstance(err, grpc.Call):
        # Not a finished call (should not happen for unary calls): nothing to decode.
        return KmsClientError(str(err) or type(err).__name__, code=grpc.StatusCode.UNKNOWN)
    code = err.code()
    message = err.details() or ""
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(err)
    except (ValueError, DecodeError):
        # A status-details trailer that contradicts the call's code or does not
        # parse is not trustworthy; fall back to the plain code and message.
        status = None
    return error_from_status(code, status, message)


__all__ = [
    "AWS_EXCEPTION_KEY",
    "EXCEPTIONS_BY_AWS_NAME",
    "KMSD_DOMAIN",
    "LEADER_ADDRESS_KEY",
    "AccessDeniedException",
    "AlreadyExistsException",
    "ConflictException",
    "DisabledException",
    "DryRunOperationException",
    "IncorrectKeyException",
    "InvalidAliasNameException",
    "InvalidArnException",
    "InvalidCiphertextException",
    "InvalidGrantIdException",
    "InvalidGrantTokenException",
    "InvalidKeyUsageException",
    "InvalidMarkerException",
    "KMSInternalException",
    "KMSInvalidStateException",
    "KmsClientError",
    "LimitExceededException",
    "MalformedPolicyDocumentException",
    "NotFoundException",
    "TagException",
    "ThrottlingException",
    "UnsupportedOperationException",
    "ValidationException",
    "error_from_status",
    "from_rpc_error",
]
