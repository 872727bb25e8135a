"""Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases.

As in AWS, CreateAlias needs kms:CreateAlias on the target key, UpdateAlias
kms:UpdateAlias on both the current and the new target, DeleteAlias kms:DeleteAlias
on the alias's key; ListAliases is an account-level operation (key creators).
"""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb

from kmsd.auth.authorizer import Caller
from kmsd.errors import NotFoundError, ValidationError
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.names import validate_alias_name
from kmsd.service.paging import page
from kmsd.service.views import alias_entry


async def _target(
    kms: Kms, caller: Caller, request: pb.CreateAliasRequest | pb.UpdateAliasRequest, action: str
) -> str:
    # AWS: the target of an alias must be a key, named by key id or key ARN.
    target_key_id = request.target_key_id
    if target_key_id.startswith("alias/") or ":alias/" in target_key_id:
        raise ValidationError("target_key_id", "must be a key id or key ARN, not an alias")
    key = await access.key_for_write(
        kms, caller, target_key_id, action, "target_key_id", request=request
    )
    return key.key_id


def _aliased_key(kms: Kms, caller: Caller, alias_name: str, action: str) -> None:
    """Authorizes `action` on the key an existing alias points at; a missing alias is
    AccessDenied for non-administrators (like a missing key)."""
    alias = kms.store.alias(alias_name)
    key = kms.store.key(alias.target_key_id) if alias is not None else None
    if alias is None or key is None:
        if access.hides_existence(kms, caller):
            raise access.denied(caller, action, alias_name, "no such alias")
        raise NotFoundError(f"Alias {alias_name} does not exist.")
    access.authorize(kms, caller, key, action, alias_name)


async def create_alias(
    kms: Kms, request: pb.CreateAliasRequest, caller: Caller
) -> pb.CreateAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    target = await _target(kms, caller, request, "kms:CreateAlias")
    command = kms.command(request, caller.principal)
    command.create_alias.CopyFrom(
        fsm.CreateAlias(alias_name=request.alias_name, target_key_id=target)
    )
    committed = await kms.propose(command)
    return pb.CreateAliasResponse(commit_index=committed.commit_index)


async def update_alias(
    kms: Kms, request: pb.UpdateAliasRequest, caller: Caller
) -> pb.UpdateAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    target = await _target(kms, caller, request, "kms:UpdateAlias")
    if access.replayed(kms, request, caller) is None:
        _aliased_key(kms, caller, request.alias_name, "kms:UpdateAlias")
    command = kms.command(request, caller.principal)
    command.update_alias.CopyFrom(
        fsm.UpdateAlias(alias_name=request.alias_name, target_key_id=target)
    )
    committed = await kms.propose(command)
    return pb.UpdateAliasResponse(commit_index=committed.commit_index)


async def delete_alias(
    kms: Kms, request: pb.DeleteAliasRequest, caller: Caller
) -> pb.DeleteAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    await kms.read()
    if access.replayed(kms, request, caller) is None:
        _aliased_key(kms, caller, request.alias_name, "kms:DeleteAlias")
    command = kms.command(request, caller.principal)
    command.delete_alias.alias_name = request.alias_name
    committed = await kms.propose(command)
    return pb.DeleteAliasResponse(commit_index=committed.commit_index)


async def list_aliases(
    kms: Kms, request: pb.ListAliasesRequest, caller: Caller
) -> pb.ListAliasesResponse:
    access.require_account(kms, caller, "ListAliases")
    await kms.read(request.min_commit_index)
    target = (
        access.resolve(kms, caller, request.key_id, "kms:ListAliases").key_id
        if request.key_id
        else ""
    )
    chosen, next_marker = page(
        kms.store.aliases(target),
        lambda a: a.alias_name,
        f"aliases/{target}",
        request.limit,
        request.marker,
        max_limit=100,
        default_limit=50,
    )
    return pb.ListAliasesResponse(
        aliases=[alias_entry(kms.names, alias) for alias in chosen],
        next_marker=next_marker,
        truncated=bool(next_marker),
    )
