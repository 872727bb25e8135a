"""Authorization inside the KMS operations: who is asking, may they, and grant tokens.

Every operation checks its caller here after the node's state is fresh enough (so
every node gives the same answer for the same state) and before it reveals
anything about the key:

- `resolve` names the key of a request; for a caller who is not an administrator a
  key that does not exist is AccessDenied, worded exactly like a key the caller may
  not use, so keys cannot be probed;
- `authorize` decides one `kms:` action on one key from its policy and the caller's
  grants (kmsd.auth.authorizer), with the request's condition keys;
- `require_account` guards the account-level operations (key creators);
- `wait_for_grant_tokens` makes grants usable at once: it waits until this node has
  applied every grant a request's tokens name;
- `replayed` recognises the retry of a mutation that was applied already, whose checks
  (the alias or grant it deleted, the permission a new policy took away) would now
  fail: it goes straight to the log, which answers with the first result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.message import Message
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.auth.authorizer import Caller
from kmsd.auth.conditions import ContextValue, Lookup
from kmsd.auth.grants import decode_token
from kmsd.errors import AccessDeniedError, InvalidGrantTokenError, NotFoundError
from kmsd.service import validate
from kmsd.service.context import Kms, request_digest

_EC_PREFIX = "kms:encryptioncontext:"
_TAG_PREFIX = "aws:resourcetag/"


def _quoted(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def denied(caller: Caller, action: str, target: str, why: str) -> AccessDeniedError:
    """The AccessDenied for `action` on `target` (as the request named it). The message
    is the same whether the key exists or not; `why` goes to the audit log only."""
    return AccessDeniedError(
        f"{_quoted(caller.principal)} is not authorized to perform {action} on {_quoted(target)}.",
        denial=why,
    )


def require_account(kms: Kms, caller: Caller, operation: str) -> None:
    """Account-level operations (CreateKey, ListKeys, ListAliases, GenerateRandom)."""
    if not kms.authorizer.may_use_account(caller):
        raise denied(
            caller,
            f"kms:{operation}",
            f"account {kms.names.account}",
            "neither an administrator nor a key creator",
        )


def hides_existence(kms: Kms, caller: Caller) -> bool:
    """True when a missing key must look like a forbidden one to this caller."""
    return kms.authorizer.enabled and not kms.authorizer.is_admin(caller)


def resolve(
    kms: Kms, caller: Caller, key_ref: str, action: str, field: str = "key_id"
) -> fsm.KeyRecord:
    """The key `key_ref` names; a missing key is AccessDenied unless the caller is an
    administrator (who gets NotFound)."""
    try:
        return kms.names.resolve(kms.store, key_ref, field)
    except NotFoundError:
        if hides_existence(kms, caller):
            raise denied(caller, action, key_ref, "no such key") from None
        raise


def _aws_name(name: str, prefix: str) -> str:
    """The AWS spelling of an enum value's name ("KEY_SPEC_SYMMETRIC_DEFAULT" ->
    "SYMMETRIC_DEFAULT")."""
    return name.removeprefix(prefix)


def condition_lookup(
    kms: Kms,
    caller: Caller,
    key: fsm.KeyRecord | None,
    key_ref: str = "",
    encryption_context: Mapping[str, str] | None = None,
    extra: Mapping[str, ContextValue] | None = None,
) -> Lookup:
    """The condition keys of one request (lowercased names), computed only when a policy
    asks (docs/security.md lists them). Keys a request does not have are absent."""

    def lookup(name: str) -> ContextValue | None:
        if extra:
            for extra_name, value in extra.items():
                if extra_name.lower() == name:
                    return value
        if name in ("kms:calleraccount", "aws:principalaccount"):
            return kms.names.account
        if name == "aws:principalarn":
            return caller.principal
        if name == "kms:requestalias":
            if key_ref.startswith("alias/"):
                return key_ref
            if key_ref.startswith("arn:") and ":alias/" in key_ref:
                return key_ref.split(":", 5)[-1]
            return None
        if encryption_context is not None:
            if name == "kms:encryptioncontextkeys":
                return list(encryption_context)
            if name.startswith(_EC_PREFIX):
                wanted = name[len(_EC_PREFIX) :]
                found = [v for k, v in encryption_context.items() if k.lower() == wanted]
                return found or None
        if key is None:
            return None
        if name == "kms:keyspec":
            return _aws_name(res.KeySpec.Name(key.key_spec), "KEY_SPEC_")
        if name == "kms:keyusage":
            return _aws_name(res.KeyUsage.Name(key.key_usage), "KEY_USAGE_")
        if name == "kms:keyorigin":
            return _aws_name(res.Origin.Name(key.origin), "ORIGIN_")
        if name == "kms:resourcealiases":
            return [a.alias_name for a in kms.store.aliases(key.key_id)] or None
        if name.startswith(_TAG_PREFIX):
            wanted = name[len(_TAG_PREFIX) :]
            tags = [t.tag_value for t in key.tags if t.tag_key.lower() == wanted]
            return tags or None
        return None

    return lookup


def authorize(
    kms: Kms,
    caller: Caller,
    key: fsm.KeyRecord,
    action: str,
    key_ref: str,
    *,
    encryption_context: Mapping[str, str] | None = None,
    extra: Mapping[str, ContextValue] | None = None,
    grants: Sequence[fsm.GrantRecord] | None = None,
) -> None:
    """Raises AccessDenied unless `caller` may do `action` (kms:Encrypt...) on `key`.
    `key_ref` is the key as the request named it (echoed in the error);
    `encryption_context` is the request's, for conditions and grant constraints (None
    for operations that take none). `grants` replaces the caller's grants on the key
    (CreateGrant counts only those it may delegate)."""
    authorizer = kms.authorizer
    if not authorizer.enabled:
        return
    verdict = authorizer.decide(
        caller,
        action,
        kms.names.key_arn(key.key_id),
        key.policy,
        kms.store.grants_for(key.key_id, caller.principal) if grants is None else grants,
        condition_lookup(kms, caller, key, key_ref, encryption_context, extra),
        encryption_context,
    )
    if not verdict.allowed:
        raise denied(caller, action, key_ref, verdict.why)


def grant_token_index(tokens: Sequence[str], field: str = "grant_tokens") -> int:
    """Validates a request's grant tokens; returns the highest log index they name."""
    validate.grant_tokens(tokens)
    return max((decode_token(token, field).index for token in tokens), default=0)


async def wait_for_grant_tokens(
    kms: Kms, tokens: Sequence[str], field: str = "grant_tokens"
) -> None:
    """Waits until this node has applied every grant the tokens name, so a grant is
    usable at once. A token naming an index the cluster has not committed is forged:
    InvalidGrantToken (found by one linearizable read, never by waiting out a timeout)."""
    index = grant_token_index(tokens, field)
    if index <= kms.log.applied_index:
        return
    # A genuine token's grant was committed before its CreateGrant answered, so a
    # linearizable read started now covers it.
    await kms.log.read_barrier(0.0)
    if kms.log.applied_index < index:
        raise InvalidGrantTokenError(field, "is not a grant token this cluster issued")


def replayed(kms: Kms, request: Message, caller: Caller) -> fsm.DedupeEntry | None:
    """The first outcome of this very request by this caller (same request_id, same
    parameters), if it was applied already: its retry is answered from the log's
    deduplication, without the checks the first attempt passed. Call it on
    linearizable state (after `Kms.read()`)."""
    request_id = getattr(request, "request_id", "")
    entry = kms.store.remembered(request_id) if request_id else None
    if entry is None or entry.command_digest != request_digest(request, caller.principal):
        return None
    return entry


async def key_for_write(
    kms: Kms,
    caller: Caller,
    key_ref: str,
    action: str,
    field: str = "key_id",
    extra: Mapping[str, ContextValue] | None = None,
    request: Message | None = None,
) -> fsm.KeyRecord:
    """The key a mutation names, on linearizable state (a follower that lags must not
    deny or miss a key created a moment ago elsewhere), once `caller` may do `action`
    (the retry of `request`, applied already, is not checked again)."""
    await kms.read()
    key = resolve(kms, caller, key_ref, action, field)
    if request is None or replayed(kms, request, caller) is None:
        authorize(kms, caller, key, action, key_ref, extra=extra)
    return key


async def key_for_read(
    kms: Kms, caller: Caller, key_ref: str, action: str, min_commit_index: int = 0
) -> fsm.KeyRecord:
    """The key a control-plane read names (linearizable), once `caller` may do `action`."""
    await kms.read(min_commit_index)
    key = resolve(kms, caller, key_ref, action)
    authorize(kms, caller, key, action, key_ref)
    return key
