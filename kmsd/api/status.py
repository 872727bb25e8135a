"""The one place a kmsd error becomes a gRPC status: code, message, ErrorInfo and details.

Every error carries a `google.rpc.ErrorInfo` (reason, domain "kmsd",
metadata["aws_exception"]); validation errors add `google.rpc.BadRequest` field
violations and retryable ones `google.rpc.RetryInfo`.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from kmsd.errors import KmsError, ThrottlingError, UnavailableError, ValidationError

DOMAIN = "kmsd"


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: KmsError) -> status_pb2.Status:
    """The google.rpc.Status for `error`."""
    metadata = {"aws_exception": error.aws_exception}
    if isinstance(error, UnavailableError) and error.leader_address:
        metadata["leader_address"] = error.leader_address
    details = [
        _packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))
    ]
    if isinstance(error, ValidationError):
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, (UnavailableError, ThrottlingError)):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_seconds * 1000))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=error.code, message=error.message, details=details)


def to_grpc_status(error: KmsError) -> grpc.Status:
    """The grpc.Status to pass to `ServicerContext.abort_with_status`."""
    return rpc_status.to_status(to_rpc_status(error))


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: KmsError) -> NoReturn:
    """Ends the call with `error`'s status."""
    await context.abort_with_status(to_grpc_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover
