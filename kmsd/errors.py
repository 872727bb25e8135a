"""The one exception tree of kmsd; each class knows its gRPC code, reason and AWS name.

This module imports no gRPC: codes are the canonical `google.rpc.Code` numbers, so
`crypto/`, `fsm/` and `storage/` may raise these errors freely. The mapping to a
`google.rpc.Status` happens once, in `kmsd.api.status`.

    KmsError
    ├── NotFoundError                 NOT_FOUND            NotFoundException
    ├── AlreadyExistsError            ALREADY_EXISTS       AlreadyExistsException
    ├── ValidationError               INVALID_ARGUMENT     ValidationException (field violations)
    │   ├── InvalidAliasNameError                          InvalidAliasNameException
    │   ├── InvalidArnError                                InvalidArnException
    │   ├── InvalidMarkerError                             InvalidMarkerException
    │   ├── TagError                                       TagException
    │   ├── MalformedPolicyDocumentError                   MalformedPolicyDocumentException
    │   ├── InvalidGrantTokenError                         InvalidGrantTokenException
    │   └── InvalidGrantIdError                            InvalidGrantIdException
    ├── InvalidCiphertextError        INVALID_ARGUMENT     InvalidCiphertextException (opaque)
    ├── IncorrectKeyError             INVALID_ARGUMENT     IncorrectKeyException
    ├── InvalidKeyUsageError          INVALID_ARGUMENT     InvalidKeyUsageException
    ├── UnsupportedOperationError     INVALID_ARGUMENT     UnsupportedOperationException
    ├── DisabledError                 FAILED_PRECONDITION  DisabledException
    ├── InvalidStateError             FAILED_PRECONDITION  KMSInvalidStateException
    ├── DryRunError                   FAILED_PRECONDITION  DryRunOperationException
    ├── ConflictError                 ABORTED              ConflictException
    ├── LimitExceededError            RESOURCE_EXHAUSTED   LimitExceededException
    ├── ThrottlingError               RESOURCE_EXHAUSTED   ThrottlingException (retryable)
    ├── AccessDeniedError             PERMISSION_DENIED    AccessDeniedException
    ├── UnavailableError              UNAVAILABLE          KMSInternalException (retryable)
    ├── StorageCorruptedError         DATA_LOSS            KMSInternalException
    └── InternalError                 INTERNAL             KMSInternalException
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Canonical google.rpc.Code values (google/rpc/code.proto).
INVALID_ARGUMENT = 3
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: `field` is the proto field path, `description` says why."""

    field: str
    description: str


class KmsError(Exception):
    """Base of every error kmsd reports to a caller."""

    code: int = INTERNAL
    reason: str = "KMS_INTERNAL"
    aws_exception: str = "KMSInternalException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(KmsError):
    """The named key, alias or other resource does not exist."""

    code = NOT_FOUND
    reason = "NOT_FOUND"
    aws_exception = "NotFoundException"


class AlreadyExistsError(KmsError):
    """A resource with that name exists already (an alias)."""

    code = ALREADY_EXISTS
    reason = "ALREADY_EXISTS"
    aws_exception = "AlreadyExistsException"


class ValidationError(KmsError):
    """A request field is missing, malformed or out of range."""

    code = INVALID_ARGUMENT
    reason = "VALIDATION_FAILED"
    aws_exception = "ValidationException"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations: Sequence[FieldViolation] = (FieldViolation(field, description),)


class InvalidAliasNameError(ValidationError):
    """An alias name breaks the AWS alias naming rules."""

    reason = "INVALID_ALIAS_NAME"
    aws_exception = "InvalidAliasNameException"


class InvalidArnError(ValidationError):
    """A key id, ARN or alias is malformed."""

    reason = "INVALID_ARN"
    aws_exception = "InvalidArnException"


class InvalidMarkerError(ValidationError):
    """A paging marker was not one this service issued for this listing."""

    reason = "INVALID_MARKER"
    aws_exception = "InvalidMarkerException"


class TagError(ValidationError):
    """A tag key or value breaks the tagging rules."""

    reason = "TAG_INVALID"
    aws_exception = "TagException"


class MalformedPolicyDocumentError(ValidationError):
    """A key policy is not valid JSON in the policy language kmsd evaluates, or would
    lock the caller out; the description names the statement and element at fault."""

    reason = "MALFORMED_POLICY_DOCUMENT"
    aws_exception = "MalformedPolicyDocumentException"


class InvalidGrantTokenError(ValidationError):
    """A grant token is not one this service issued (malformed, not just unknown)."""

    reason = "INVALID_GRANT_TOKEN"
    aws_exception = "InvalidGrantTokenException"


class InvalidGrantIdError(ValidationError):
    """A grant id is malformed."""

    reason = "INVALID_GRANT_ID"
    aws_exception = "InvalidGrantIdException"


class InvalidCiphertextError(KmsError):
    """The ciphertext could not be decrypted. Deliberately says nothing about why."""

    code = INVALID_ARGUMENT
    reason = "INVALID_CIPHERTEXT"
    aws_exception = "InvalidCiphertextException"

    def __init__(self, message: str = "The ciphertext is invalid.") -> None:
        super().__init__(message)


class IncorrectKeyError(KmsError):
    """The key named in the request is not the key that encrypted the ciphertext."""

    code = INVALID_ARGUMENT
    reason = "INCORRECT_KEY"
    aws_exception = "IncorrectKeyException"


class InvalidKeyUsageError(KmsError):
    """The key's usage or spec does not allow this operation."""

    code = INVALID_ARGUMENT
    reason = "INVALID_KEY_USAGE"
    aws_exception = "InvalidKeyUsageException"


class UnsupportedOperationError(KmsError):
    """The operation or option is not supported (yet) by kmsd or for this key."""

    code = INVALID_ARGUMENT
    reason = "UNSUPPORTED_OPERATION"
    aws_exception = "UnsupportedOperationException"


class DisabledError(KmsError):
    """The key is disabled."""

    code = FAILED_PRECONDITION
    reason = "KEY_DISABLED"
    aws_exception = "DisabledException"


class InvalidStateError(KmsError):
    """The key's state does not allow this operation (AWS key state table)."""

    code = FAILED_PRECONDITION
    reason = "KMS_INVALID_STATE"
    aws_exception = "KMSInvalidStateException"


class DryRunError(KmsError):
    """A dry run that would have succeeded (AWS DryRunOperationException)."""

    code = FAILED_PRECONDITION
    reason = "DRY_RUN_OPERATION"
    aws_exception = "DryRunOperationException"

    def __init__(
        self, message: str = "The request would have succeeded, but DryRun was set."
    ) -> None:
        super().__init__(message)


class ConflictError(KmsError):
    """The request conflicts with work in progress on the same resource."""

    code = ABORTED
    reason = "CONFLICT"
    aws_exception = "ConflictException"


class LimitExceededError(KmsError):
    """A per-resource limit would be exceeded (on-demand rotations, aliases, tags...)."""

    code = RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"
    aws_exception = "LimitExceededException"


class ThrottlingError(KmsError):
    """The caller sent requests faster than its configured rate ([limits])."""

    code = RESOURCE_EXHAUSTED
    reason = "THROTTLING"
    aws_exception = "ThrottlingException"

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class AccessDeniedError(KmsError):
    """The caller may not perform this operation. The message never says why (a missing
    key and a key the caller may not use look alike); `denial` does, for the audit log
    only."""

    code = PERMISSION_DENIED
    reason = "ACCESS_DENIED"
    aws_exception = "AccessDeniedException"

    def __init__(self, message: str, denial: str = "") -> None:
        super().__init__(message)
        self.denial = denial


class UnavailableError(KmsError):
    """The service cannot take the request now; the caller should retry."""

    code = UNAVAILABLE
    reason = "UNAVAILABLE"
    aws_exception = "KMSInternalException"

    def __init__(
        self, message: str, retry_after_seconds: float = 0.1, leader_address: str = ""
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        # Where the leader's client API is, when this node knows and is not it.
        self.leader_address = leader_address


class StorageCorruptedError(KmsError):
    """Durable state failed an integrity check; the node must not serve from it."""

    code = DATA_LOSS
    reason = "STORAGE_CORRUPTED"
    aws_exception = "KMSInternalException"


class InternalError(KmsError):
    """An unexpected failure inside kmsd."""


def _all_subclasses(cls: type[KmsError]) -> list[type[KmsError]]:
    found: list[type[KmsError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_from_reason(reason: str, message: str, field: str = "") -> KmsError:
    """Rebuilds the error a state machine recorded by reason (see `fsm.CommandError`)."""
    candidates: list[type[KmsError]] = [KmsError, *_all_subclasses(KmsError)]
    for cls in candidates:
        if cls.reason != reason:
            continue
        if issubclass(cls, ValidationError):
            return cls(field or "request", message)
        return cls(message)
    return InternalError(message)
