"""Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases."""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb

from kmsd.errors import ValidationError
from kmsd.service import validate
from kmsd.service.context import Kms
from kmsd.service.names import validate_alias_name
from kmsd.service.paging import page
from kmsd.service.views import alias_entry


async def _target(kms: Kms, target_key_id: str) -> str:
    # AWS: the target of an alias must be a key, named by key id or key ARN.
    if target_key_id.startswith("alias/") or ":alias/" in target_key_id:
        raise ValidationError("target_key_id", "must be a key id or key ARN, not an alias")
    return (await kms.resolve_for_write(target_key_id, "target_key_id")).key_id


async def create_alias(kms: Kms, request: pb.CreateAliasRequest) -> pb.CreateAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    command = kms.command(request)
    command.create_alias.CopyFrom(
        fsm.CreateAlias(
            alias_name=request.alias_name, target_key_id=await _target(kms, request.target_key_id)
        )
    )
    committed = await kms.propose(command)
    return pb.CreateAliasResponse(commit_index=committed.commit_index)


async def update_alias(kms: Kms, request: pb.UpdateAliasRequest) -> pb.UpdateAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    command = kms.command(request)
    command.update_alias.CopyFrom(
        fsm.UpdateAlias(
            alias_name=request.alias_name, target_key_id=await _target(kms, request.target_key_id)
        )
    )
    committed = await kms.propose(command)
    return pb.UpdateAliasResponse(commit_index=committed.commit_index)


async def delete_alias(kms: Kms, request: pb.DeleteAliasRequest) -> pb.DeleteAliasResponse:
    validate.request_id(request.request_id)
    validate_alias_name(request.alias_name)
    command = kms.command(request)
    command.delete_alias.alias_name = request.alias_name
    committed = await kms.propose(command)
    return pb.DeleteAliasResponse(commit_index=committed.commit_index)


async def list_aliases(kms: Kms, request: pb.ListAliasesRequest) -> pb.ListAliasesResponse:
    await kms.read(request.min_commit_index)
    target = kms.names.resolve(kms.store, request.key_id).key_id if request.key_id else ""
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
