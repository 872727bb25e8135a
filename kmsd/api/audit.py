"""The audit hook of the gRPC API: every KMS and cluster RPC, allowed or refused, leaves
one record (docs/audit.md) before its answer leaves the node.

`AuditHook.call` wraps an RPC: it refuses at once (UNAVAILABLE) while the audit log
cannot be written, runs the operation, records the outcome and waits until the
record is durable, then answers; if the record cannot be written the caller gets
UNAVAILABLE instead of the answer (fail closed). A mutation whose command reached
the log is the exception: its record travels in the command and is written when the
command applies (`kmsd.audit.logged`), so the answer does not wait for it. A call
cancelled by its client is recorded too (without waiting). What is recorded is
chosen field by field here: names, ids, ARNs and encryption contexts, never
plaintext, ciphertext, data keys or key material. Grant tokens are recorded only as
SHA-256 digests, key policies as their digest and size; a refusal records why in
`detail.denial`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kmsd.api.status import abort
from kmsd.audit.logged import CURRENT_CALL
from kmsd.audit.record import AuditEvent, bounded, bounded_context, new_request_id
from kmsd.audit.writer import AuditUnavailable, AuditWriter
from kmsd.auth.grants import OPERATION_NAMES, decode_token
from kmsd.auth.identity import principal_of
from kmsd.errors import AccessDeniedError, InternalError, KmsError
from kmsd.fsm.store import KeyStore
from kmsd.service.names import Names

log = logging.getLogger(__name__)

Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]

# Request fields naming the key an operation acts on, in order of preference.
_KEY_FIELDS = ("key_id", "target_key_id", "destination_key_id", "alias_name")


@dataclass(frozen=True)
class _Shape:
    """Which audit-relevant fields a request or response type has."""

    operation: str
    key_fields: tuple[str, ...]
    has_context: bool
    has_request_id: bool
    is_reencrypt: bool


_SHAPES: dict[type[Message], _Shape] = {}


def _shape(request: Message) -> _Shape:
    kind = type(request)
    shape = _SHAPES.get(kind)
    if shape is None:
        fields = request.DESCRIPTOR.fields_by_name
        name = request.DESCRIPTOR.name
        shape = _Shape(
            operation=name.removesuffix("Request"),
            key_fields=tuple(f for f in _KEY_FIELDS if f in fields),
            has_context="encryption_context" in fields,
            has_request_id="request_id" in fields,
            is_reencrypt="source_encryption_context" in fields,
        )
        _SHAPES[kind] = shape
    return shape


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _extras(request: Message, response: Message | Any | None) -> dict[str, Any]:
    """What the audit log keeps of policies and grants: ids, principals, operations,
    digests of tokens and policy documents (never a token itself)."""
    extras: dict[str, Any] = {}
    tokens = getattr(request, "grant_tokens", None)
    if tokens:
        extras["grant_tokens_sha256"] = [_digest(t) for t in list(tokens)[:10]]
    token = getattr(request, "grant_token", "")
    if isinstance(token, str) and token:
        extras["grant_token_sha256"] = _digest(token)
    policy = getattr(request, "policy", "")
    if isinstance(policy, str) and policy:
        extras["policy_sha256"] = _digest(policy)
        extras["policy_bytes"] = len(policy.encode("utf-8", "surrogatepass"))
    grant_id = getattr(response, "grant_id", "") or getattr(request, "grant_id", "")
    if isinstance(grant_id, str) and grant_id:
        extras["grant_id"] = bounded(grant_id, 128)
    for name in ("grantee_principal", "retiring_principal"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            extras[name] = bounded(value, 256)
    operations = getattr(request, "operations", None)
    if operations:
        extras["operations"] = [OPERATION_NAMES.get(op, str(op)) for op in list(operations)[:20]]
    return extras


class _Call:
    """One RPC being served, for `kmsd.audit.logged`: drafts its record for a command."""

    __slots__ = ("_hook", "_request", "_context", "_principal", "logged")

    def __init__(self, hook: AuditHook, request: Message, context: Ctx, principal: str | None):
        self._hook = hook
        self._request = request
        self._context = context
        self._principal = principal
        self.logged = False

    @property
    def context(self) -> Ctx:
        return self._context

    def event(
        self, response: Message | Any | None, error: KmsError | None, *, cancelled: bool = False
    ) -> AuditEvent:
        """The record of this call with its outcome."""
        return self._hook.event(
            self._request,
            self._context,
            response,
            error,
            cancelled=cancelled,
            principal=self._principal,
        )

    def draft_event(self) -> AuditEvent:
        return self.event(None, None)


class AuditHook:
    """Records RPC outcomes into an `AuditWriter`."""

    def __init__(self, writer: AuditWriter, names: Names, store: KeyStore) -> None:
        self.writer = writer
        self._names = names
        self._store = store

    async def call(
        self,
        request: Message,
        context: Ctx,
        run: Callable[[], Awaitable[Resp]],
        principal: str | None = None,
    ) -> Resp:
        """Runs one RPC with its audit record; aborts the call with its error (or with
        UNAVAILABLE when the record cannot be written). `principal` is the caller's, if
        the servicer knows it already (else it is read from `context`)."""
        writer = self.writer
        if not writer.available:
            await abort(context, writer.unavailable_error())
        writer.calls_in_flight += 1  # see AuditWriter._sync_inline
        call = _Call(self, request, context, principal)
        token = CURRENT_CALL.set(call)
        try:
            try:
                response = await run()
            except KmsError as error:
                await self._record_outcome(call, None, error)
                await abort(context, error)
            except grpc.aio.AbortError:
                raise  # the body aborted the call itself (never expected)
            except Exception:
                # The traceback names code, never request contents (which may be plaintext).
                log.exception("internal error in %s", _shape(request).operation)
                internal = InternalError("internal error")
                await self._record_outcome(call, None, internal)
                await abort(context, internal)
            except asyncio.CancelledError:
                self._record_nowait(call.event(None, None, cancelled=True))
                raise
            await self._record_outcome(call, response, None)
            return response
        finally:
            CURRENT_CALL.reset(token)
            writer.calls_in_flight -= 1

    async def refused(self, context: Ctx, type_name: str, error: KmsError) -> None:
        """Records a request refused before it reached an operation (it did not parse)."""
        event = AuditEvent(
            operation=type_name.removesuffix("Request"),
            outcome="error",
            principal=principal_of(context),
            source=context.peer() or "",
            request_id=new_request_id(),
            error_reason=error.reason,
            aws_exception=error.aws_exception,
        )
        await self._record(event, context)

    async def _record_outcome(
        self, call: _Call, response: Message | Any | None, error: KmsError | None
    ) -> None:
        """Records how `call` ended, unless its command's record, written from the log
        (`kmsd.audit.logged`), says so already."""
        if not call.logged:
            await self._record(call.event(response, error), call.context)

    async def _record(self, event: AuditEvent, context: Ctx) -> None:
        try:
            await self.writer.record(event)
        except AuditUnavailable as error:
            await abort(context, error)
        except (ValueError, TypeError) as error:
            # A record that cannot be encoded (never expected): refuse this request only.
            log.error("audit: cannot encode the record of %s: %s", event.operation, error)
            await abort(context, InternalError("internal error"))

    def _record_nowait(self, event: AuditEvent) -> None:
        try:
            self.writer.submit(event)
        except (AuditUnavailable, ValueError, TypeError) as error:
            log.warning("audit: cannot record the cancelled %s: %s", event.operation, error)

    def event(
        self,
        request: Message,
        context: Ctx,
        response: Message | Any | None,
        error: KmsError | None,
        *,
        cancelled: bool = False,
        principal: str | None = None,
    ) -> AuditEvent:
        """The record of one RPC outcome (public for tests)."""
        shape = _shape(request)
        request_id = getattr(request, "request_id", "") if shape.has_request_id else ""
        detail: dict[str, Any] | None = None
        if shape.is_reencrypt:
            source_arn = getattr(response, "source_key_id", "") or self._key_arn(
                getattr(request, "source_key_id", "")
            )
            detail = {
                "source_key_arn": source_arn or None,
                "source_encryption_context": bounded_context(
                    getattr(request, "source_encryption_context", {})
                ),
            }
            context_map = getattr(request, "destination_encryption_context", {})
        else:
            context_map = getattr(request, "encryption_context", {}) if shape.has_context else {}
        if cancelled:
            outcome, reason, exception = "error", "CANCELLED", ""
        elif error is not None:
            outcome, reason, exception = "error", error.reason, error.aws_exception
        else:
            outcome, reason, exception = "ok", "", ""
        extras = _extras(request, response)
        if isinstance(error, AccessDeniedError) and error.denial:
            extras["denial"] = error.denial
        if extras:
            detail = {**(detail or {}), **extras}
        return AuditEvent(
            operation=shape.operation,
            outcome=outcome,
            principal=principal_of(context) if principal is None else principal,
            source=context.peer() or "",
            key_arn=self._response_key_arn(response)
            or self._request_key_arn(request, shape)
            or self._token_key_arn(request),
            request_id=request_id or new_request_id(),
            encryption_context=bounded_context(context_map),
            error_reason=reason,
            aws_exception=exception,
            detail=detail,
        )

    @staticmethod
    def _response_key_arn(response: Message | Any | None) -> str | None:
        if response is None:
            return None
        arn = getattr(getattr(response, "key_metadata", None), "arn", "")
        if arn:
            return str(arn)
        key_id = getattr(response, "key_id", "")
        return key_id if isinstance(key_id, str) and key_id.startswith("arn:") else None

    def _request_key_arn(self, request: Message, shape: _Shape) -> str | None:
        for name in shape.key_fields:
            ref = getattr(request, name, "")
            if ref:
                return self._key_arn(ref)
        return None

    def _token_key_arn(self, request: Message) -> str | None:
        """RetireGrant by grant token names no key: the ARN of its grant's key, if known."""
        token = getattr(request, "grant_token", "")
        if not isinstance(token, str) or not token:
            return None
        try:
            grant = self._store.grant(decode_token(token, "grant_token").grant_id)
        except KmsError:
            return None
        return self._names.key_arn(grant.key_id) if grant is not None else None

    def _key_arn(self, ref: str) -> str | None:
        """The ARN of the key `ref` names, else `ref` as given (e.g. an unknown alias)."""
        if not ref:
            return None
        try:
            return self._names.key_arn(self._names.key_id_of(self._store, ref))
        except (KmsError, ValueError):
            return bounded(ref)
