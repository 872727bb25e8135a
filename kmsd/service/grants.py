"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

Who may do what follows AWS: CreateGrant needs kms:CreateGrant from the key policy,
or a grant with CreateGrant whose operations and constraints cover the new grant;
RetireGrant is decided by the grant (its retiring principal, its grantee if it
allows RetireGrant, and the administrators); RevokeGrant needs kms:RevokeGrant;
ListGrants needs kms:ListGrants; ListRetirableGrants lists the caller's own (an
administrator's: anyone's). The grant token CreateGrant returns names the grant and
the log index it was committed at (kmsd.auth.grants).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.auth.authorizer import Caller
from kmsd.auth.conditions import ContextValue
from kmsd.auth.grants import (
    GRANT_ID,
    MAX_CONSTRAINT_PAIRS,
    MAX_CONSTRAINT_VALUE,
    OPERATION_NAMES,
    SYMMETRIC_OPERATIONS,
    decode_token,
    encode_token,
    has_constraints,
    may_delegate,
)
from kmsd.auth.policy import Decision
from kmsd.errors import (
    DryRunError,
    InvalidGrantIdError,
    NotFoundError,
    ValidationError,
)
from kmsd.fsm.key_states import check_key_state
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.paging import page
from kmsd.service.views import grant_entry

MAX_PRINCIPAL = 256
MAX_GRANT_NAME = 256
MAX_GRANT_ID = 128
_GRANT_NAME = re.compile(r"[a-zA-Z0-9:/_-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def principal_field(field: str, value: str, required: bool) -> None:
    if not value:
        if required:
            raise ValidationError(field, "is required")
        return
    if len(value) > MAX_PRINCIPAL:
        raise ValidationError(field, f"must be at most {MAX_PRINCIPAL} characters")
    if _CONTROL.search(value):
        raise ValidationError(field, "must not contain control characters")


def grant_id_field(value: str, field: str = "grant_id") -> None:
    if not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_GRANT_ID or not GRANT_ID.fullmatch(value):
        raise InvalidGrantIdError(field, "is not a grant id (64 lowercase hex digits)")


def _operations(values: Sequence[int]) -> None:
    if not values:
        raise ValidationError("operations", "at least one operation is required")
    seen: set[int] = set()
    for value in values:
        if value not in SYMMETRIC_OPERATIONS:
            name = OPERATION_NAMES.get(value, str(value))
            raise ValidationError(
                "operations", f"{name} is not a grant operation of symmetric encryption keys"
            )
        if value in seen:
            raise ValidationError("operations", f"{OPERATION_NAMES[value]} is given twice")
        seen.add(value)


def _constraint_map(field: str, pairs: Mapping[str, str]) -> None:
    if len(pairs) > MAX_CONSTRAINT_PAIRS:
        raise ValidationError(field, f"at most {MAX_CONSTRAINT_PAIRS} pairs")
    folded: set[str] = set()
    for key, value in pairs.items():
        if not key:
            raise ValidationError(field, "keys must not be empty")
        if len(value) > MAX_CONSTRAINT_VALUE:
            raise ValidationError(
                field, f"values must be at most {MAX_CONSTRAINT_VALUE} characters"
            )
        if key.lower() in folded:
            # Constraint keys compare case-insensitively: two such keys are ambiguous.
            raise ValidationError(field, f"has keys that differ only by case ('{key[:40]}')")
        folded.add(key.lower())


def _constraints(request: pb.CreateGrantRequest) -> res.GrantConstraints:
    constraints = request.constraints
    _constraint_map("constraints.encryption_context_equals", constraints.encryption_context_equals)
    _constraint_map("constraints.encryption_context_subset", constraints.encryption_context_subset)
    return constraints


def _grant_condition_keys(
    request: pb.CreateGrantRequest, constraints: res.GrantConstraints
) -> dict[str, ContextValue]:
    kinds = []
    if constraints.encryption_context_equals:
        kinds.append("EncryptionContextEquals")
    if constraints.encryption_context_subset:
        kinds.append("EncryptionContextSubset")
    keys: dict[str, ContextValue] = {
        "kms:grantoperations": [OPERATION_NAMES[op] for op in request.operations],
        "kms:granteeprincipal": request.grantee_principal,
        "kms:grantisforawsresource": False,
    }
    if request.retiring_principal:
        keys["kms:retiringprincipal"] = request.retiring_principal
    if kinds:
        keys["kms:grantconstrainttype"] = kinds
    return keys


async def create_grant(
    kms: Kms, request: pb.CreateGrantRequest, caller: Caller
) -> pb.CreateGrantResponse:
    validate.request_id(request.request_id)
    if not request.key_id:
        raise ValidationError("key_id", "is required")
    principal_field("grantee_principal", request.grantee_principal, required=True)
    principal_field("retiring_principal", request.retiring_principal, required=False)
    _operations(request.operations)
    operations = list(request.operations)
    constraints = _constraints(request)
    if request.name and (
        len(request.name) > MAX_GRANT_NAME or not _GRANT_NAME.fullmatch(request.name)
    ):
        raise ValidationError(
            "name", f"must be 1-{MAX_GRANT_NAME} characters of letters, digits, ':', '/', '_', '-'"
        )
    await access.wait_for_grant_tokens(kms, request.grant_tokens)
    await kms.read()
    key = access.resolve(kms, caller, request.key_id, "kms:CreateGrant")
    delegable = [
        grant
        for grant in kms.store.grants_for(key.key_id, caller.principal)
        if may_delegate(grant, operations, constraints)
    ]
    extra = _grant_condition_keys(request, constraints)
    access.authorize(
        kms,
        caller,
        key,
        "kms:CreateGrant",
        request.key_id,
        extra=extra,
        grants=delegable,
    )
    check_key_state("CreateGrant", kms.names.key_arn(key.key_id), key.key_state)
    if request.dry_run:
        raise DryRunError()
    command = kms.command(request, caller.principal)
    command.create_grant.CopyFrom(
        fsm.CreateGrant(
            key_id=key.key_id,
            grant_id=kms.rng(32).hex(),
            name=request.name,
            grantee_principal=request.grantee_principal,
            retiring_principal=request.retiring_principal,
            operations=request.operations,
        )
    )
    if has_constraints(constraints):
        command.create_grant.constraints.CopyFrom(constraints)
    committed = await kms.propose(command)
    return pb.CreateGrantResponse(
        grant_token=encode_token(committed.grant_id, committed.commit_index),
        grant_id=committed.grant_id,
        commit_index=committed.commit_index,
    )


def _listing_name(kind: str, *parts: str) -> str:
    """A short, stable name for a filtered listing (markers are bound to it)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{kind}/{digest[:24]}"


def _grant_order(grant: fsm.GrantRecord) -> str:
    return f"{grant.create_index:020d}"


async def list_grants(
    kms: Kms, request: pb.ListGrantsRequest, caller: Caller
) -> pb.ListGrantsResponse:
    if request.grant_id:
        grant_id_field(request.grant_id)
    principal_field("grantee_principal", request.grantee_principal, required=False)
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:ListGrants", request.min_commit_index
    )
    grants = [
        g
        for g in kms.store.grants_of(key.key_id)
        if (not request.grant_id or g.grant_id == request.grant_id)
        and (not request.grantee_principal or g.grantee_principal == request.grantee_principal)
    ]
    chosen, next_marker = page(
        grants,
        _grant_order,
        _listing_name("grants", key.key_id, request.grant_id, request.grantee_principal),
        request.limit,
        request.marker,
        max_limit=100,
        default_limit=50,
    )
    return pb.ListGrantsResponse(
        grants=[grant_entry(kms.names, g) for g in chosen],
        next_marker=next_marker,
        truncated=bool(next_marker),
    )


async def list_retirable_grants(
    kms: Kms, request: pb.ListRetirableGrantsRequest, caller: Caller
) -> pb.ListRetirableGrantsResponse:
    principal_field("retiring_principal", request.retiring_principal, required=True)
    authorizer = kms.authorizer
    if (
        authorizer.enabled
        and not authorizer.is_admin(caller)
        and request.retiring_principal != caller.principal
    ):
        raise access.denied(
            caller,
            "kms:ListRetirableGrants",
            f"the grants of {request.retiring_principal}",
            "only administrators list another principal's retirable grants",
        )
    await kms.read(request.min_commit_index)
    chosen, next_marker = page(
        kms.store.retirable_grants(request.retiring_principal),
        _grant_order,
        _listing_name("retirable", request.retiring_principal),
        request.limit,
        request.marker,
        max_limit=100,
        default_limit=50,
    )
    return pb.ListRetirableGrantsResponse(
        grants=[grant_entry(kms.names, g) for g in chosen],
        next_marker=next_marker,
        truncated=bool(next_marker),
    )


def _may_retire(kms: Kms, caller: Caller, key: fsm.KeyRecord, grant: fsm.GrantRecord) -> bool:
    """AWS: the retiring principal, the grantee if the grant allows RetireGrant, and the
    account (administrators); an explicit Deny of kms:RetireGrant in the key policy wins."""
    authorizer = kms.authorizer
    if not authorizer.enabled:
        return True
    decision = authorizer.policy_decision(
        caller,
        "kms:RetireGrant",
        kms.names.key_arn(key.key_id),
        authorizer.policy(key.policy),
        access.condition_lookup(kms, caller, key),
    )
    if decision is Decision.DENY:
        return False
    return (
        authorizer.is_admin(caller)
        or (bool(grant.retiring_principal) and grant.retiring_principal == caller.principal)
        or (
            grant.grantee_principal == caller.principal
            and res.GRANT_OPERATION_RETIRE_GRANT in grant.operations
        )
    )


async def retire_grant(
    kms: Kms, request: pb.RetireGrantRequest, caller: Caller
) -> pb.RetireGrantResponse:
    validate.request_id(request.request_id)
    token_grant = ""
    if request.grant_token:
        validate.length_between(
            "grant_token", request.grant_token, 1, validate.MAX_GRANT_TOKEN_LENGTH
        )
        token_grant = decode_token(request.grant_token, "grant_token").grant_id
        if request.grant_id and request.grant_id != token_grant:
            raise InvalidGrantIdError("grant_id", "names another grant than grant_token")
    else:
        if not request.key_id and not request.grant_id:
            raise ValidationError("grant_token", "give grant_token, or key_id and grant_id")
        if not request.key_id:
            raise ValidationError("key_id", "is required with grant_id (or give grant_token)")
        grant_id_field(request.grant_id)
    if request.grant_token:
        await access.wait_for_grant_tokens(kms, [request.grant_token], "grant_token")
    await kms.read()
    grant_id = token_grant or request.grant_id
    first = access.replayed(kms, request, caller)
    if first is not None:
        # A retry of a RetireGrant applied already: the log answers it (first result).
        command = kms.command(request, caller.principal)
        command.retire_grant.CopyFrom(
            fsm.RetireGrant(key_id=first.result.key_id, grant_id=grant_id)
        )
        committed = await kms.propose(command)
        return pb.RetireGrantResponse(
            commit_index=committed.commit_index, key_id=kms.names.key_arn(committed.key_id)
        )
    grant = kms.store.grant(grant_id)
    if request.key_id:
        key = access.resolve(kms, caller, request.key_id, "kms:RetireGrant")
        key_ref = request.key_id
        if grant is not None and grant.key_id != key.key_id:
            grant = None
    else:
        owner = kms.store.key(grant.key_id) if grant is not None else None
        if grant is None or owner is None:
            if access.hides_existence(kms, caller):
                raise access.denied(caller, "kms:RetireGrant", f"grant {grant_id}", "no such grant")
            raise NotFoundError(f"Grant '{grant_id}' does not exist.")
        key, key_ref = owner, kms.names.key_arn(owner.key_id)
    if grant is None:
        if access.hides_existence(kms, caller):
            raise access.denied(caller, "kms:RetireGrant", key_ref, "no such grant on the key")
        raise NotFoundError(f"Grant '{grant_id}' does not exist on key '{key.key_id}'.")
    if not _may_retire(kms, caller, key, grant):
        raise access.denied(
            caller,
            "kms:RetireGrant",
            key_ref,
            "neither the grant's retiring principal, nor its grantee with RetireGrant,"
            " nor an administrator",
        )
    if request.dry_run:
        raise DryRunError()
    command = kms.command(request, caller.principal)
    command.retire_grant.CopyFrom(fsm.RetireGrant(key_id=key.key_id, grant_id=grant_id))
    committed = await kms.propose(command)
    return pb.RetireGrantResponse(
        commit_index=committed.commit_index, key_id=kms.names.key_arn(key.key_id)
    )


async def revoke_grant(
    kms: Kms, request: pb.RevokeGrantRequest, caller: Caller
) -> pb.RevokeGrantResponse:
    validate.request_id(request.request_id)
    if not request.key_id:
        raise ValidationError("key_id", "is required")
    grant_id_field(request.grant_id)
    key = await access.key_for_write(
        kms, caller, request.key_id, "kms:RevokeGrant", request=request
    )
    grant = kms.store.grant(request.grant_id)
    if (grant is None or grant.key_id != key.key_id) and not access.replayed(kms, request, caller):
        raise NotFoundError(f"Grant '{request.grant_id}' does not exist on key '{key.key_id}'.")
    if request.dry_run:
        raise DryRunError()
    command = kms.command(request, caller.principal)
    command.revoke_grant.CopyFrom(fsm.RevokeGrant(key_id=key.key_id, grant_id=request.grant_id))
    committed = await kms.propose(command)
    return pb.RevokeGrantResponse(commit_index=committed.commit_index)
