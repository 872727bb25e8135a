"""Key lifecycle operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription,
EnableKey, DisableKey, ScheduleKeyDeletion, CancelKeyDeletion."""

from __future__ import annotations

import uuid

from google.protobuf.message import Message
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.auth.authorizer import Caller
from kmsd.auth.policy import default_policy
from kmsd.errors import (
    InternalError,
    LimitExceededError,
    UnsupportedOperationError,
    ValidationError,
)
from kmsd.fsm.store import MAX_TAGS_PER_KEY
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.paging import page
from kmsd.service.policies import checked_policy
from kmsd.service.views import key_metadata, timestamp

DEFAULT_PENDING_WINDOW_DAYS = 30


def _unsupported_create_options(request: pb.CreateKeyRequest) -> None:
    # customer_master_key_spec is AWS's deprecated synonym of key_spec: either may be given.
    if request.key_spec and request.customer_master_key_spec not in (
        res.KEY_SPEC_UNSPECIFIED,
        request.key_spec,
    ):
        raise ValidationError("customer_master_key_spec", "must equal key_spec when both are set")
    key_spec = request.key_spec or request.customer_master_key_spec
    if key_spec not in (res.KEY_SPEC_UNSPECIFIED, res.KEY_SPEC_SYMMETRIC_DEFAULT):
        raise UnsupportedOperationError(
            f"key_spec {res.KeySpec.Name(key_spec)} is not supported yet;"
            " only KEY_SPEC_SYMMETRIC_DEFAULT is."
        )
    if request.key_usage not in (res.KEY_USAGE_UNSPECIFIED, res.KEY_USAGE_ENCRYPT_DECRYPT):
        raise ValidationError("key_usage", "must be KEY_USAGE_ENCRYPT_DECRYPT for symmetric keys")
    if request.origin not in (res.ORIGIN_UNSPECIFIED, res.ORIGIN_AWS_KMS):
        raise UnsupportedOperationError(
            f"origin {res.Origin.Name(request.origin)} is not supported yet;"
            " only ORIGIN_AWS_KMS is."
        )
    for name in ("custom_key_store_id", "xks_key_id", "multi_region"):
        if getattr(request, name):
            raise UnsupportedOperationError(f"{name} is not supported.")


async def create_key(
    kms: Kms, request: pb.CreateKeyRequest, caller: Caller
) -> pb.CreateKeyResponse:
    validate.request_id(request.request_id)
    validate.description(request.description)
    _unsupported_create_options(request)
    validate.tags(request.tags)
    if len(request.tags) > MAX_TAGS_PER_KEY:
        raise LimitExceededError(
            f"A key may have at most {MAX_TAGS_PER_KEY} tags; {len(request.tags)} were given."
        )
    access.require_account(kms, caller, "CreateKey")
    key_id = str(uuid.UUID(bytes=kms.rng(16), version=4))
    if request.policy:
        policy = request.policy
        checked_policy(
            kms,
            caller,
            policy,
            kms.names.key_arn(key_id),
            request.bypass_policy_lockout_safety_check,
        )
    else:
        # AWS's default key policy, plus full access for the key's creator.
        policy = default_policy(kms.names.account, caller.principal or None)
    command = kms.command(request, caller.principal)
    command.create_key.CopyFrom(
        fsm.CreateKey(
            key_id=key_id,
            description=request.description,
            key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
            key_usage=res.KEY_USAGE_ENCRYPT_DECRYPT,
            origin=res.ORIGIN_AWS_KMS,
            wrapped_material=kms.new_wrapped_material(key_id, 1),
            tags=request.tags,
            policy=policy,
        )
    )
    committed = await kms.propose(command)
    key = kms.store.key(committed.key_id)
    if key is None:
        raise InternalError("the new key is missing after commit")
    return pb.CreateKeyResponse(
        key_metadata=key_metadata(kms.names, key), commit_index=committed.commit_index
    )


async def describe_key(
    kms: Kms, request: pb.DescribeKeyRequest, caller: Caller
) -> pb.DescribeKeyResponse:
    await access.wait_for_grant_tokens(kms, request.grant_tokens)
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:DescribeKey", request.min_commit_index
    )
    return pb.DescribeKeyResponse(key_metadata=key_metadata(kms.names, key))


async def list_keys(kms: Kms, request: pb.ListKeysRequest, caller: Caller) -> pb.ListKeysResponse:
    access.require_account(kms, caller, "ListKeys")
    await kms.read(request.min_commit_index)
    keys = sorted(kms.store.keys(), key=lambda k: k.key_id)
    chosen, next_marker = page(keys, lambda k: k.key_id, "keys", request.limit, request.marker)
    return pb.ListKeysResponse(
        keys=[
            res.KeyListEntry(key_id=k.key_id, key_arn=kms.names.key_arn(k.key_id)) for k in chosen
        ],
        next_marker=next_marker,
        truncated=bool(next_marker),
    )


async def _key_id(kms: Kms, caller: Caller, request: Message, key_ref: str, action: str) -> str:
    validate.request_id(getattr(request, "request_id", ""))
    key = await access.key_for_write(kms, caller, key_ref, f"kms:{action}", request=request)
    return key.key_id


async def update_key_description(
    kms: Kms, request: pb.UpdateKeyDescriptionRequest, caller: Caller
) -> pb.UpdateKeyDescriptionResponse:
    validate.description(request.description)
    key_id = await _key_id(kms, caller, request, request.key_id, "UpdateKeyDescription")
    command = kms.command(request, caller.principal)
    command.update_key_description.CopyFrom(
        fsm.UpdateKeyDescription(key_id=key_id, description=request.description)
    )
    committed = await kms.propose(command)
    return pb.UpdateKeyDescriptionResponse(commit_index=committed.commit_index)


async def enable_key(
    kms: Kms, request: pb.EnableKeyRequest, caller: Caller
) -> pb.EnableKeyResponse:
    key_id = await _key_id(kms, caller, request, request.key_id, "EnableKey")
    command = kms.command(request, caller.principal)
    command.enable_key.key_id = key_id
    committed = await kms.propose(command)
    return pb.EnableKeyResponse(commit_index=committed.commit_index)


async def disable_key(
    kms: Kms, request: pb.DisableKeyRequest, caller: Caller
) -> pb.DisableKeyResponse:
    key_id = await _key_id(kms, caller, request, request.key_id, "DisableKey")
    command = kms.command(request, caller.principal)
    command.disable_key.key_id = key_id
    committed = await kms.propose(command)
    return pb.DisableKeyResponse(commit_index=committed.commit_index)


async def schedule_key_deletion(
    kms: Kms, request: pb.ScheduleKeyDeletionRequest, caller: Caller
) -> pb.ScheduleKeyDeletionResponse:
    window = request.pending_window_in_days or DEFAULT_PENDING_WINDOW_DAYS
    validate.in_range("pending_window_in_days", window, 7, 30)
    key_id = await _key_id(kms, caller, request, request.key_id, "ScheduleKeyDeletion")
    command = kms.command(request, caller.principal)
    command.schedule_key_deletion.CopyFrom(
        fsm.ScheduleKeyDeletion(key_id=key_id, pending_window_in_days=window)
    )
    committed = await kms.propose(command)
    key = kms.store.key(committed.key_id)
    response = pb.ScheduleKeyDeletionResponse(
        key_id=kms.names.key_arn(committed.key_id), commit_index=committed.commit_index
    )
    if key is not None:
        response.deletion_date.CopyFrom(timestamp(key.deletion_date_ms))
        response.key_state = key.key_state
        response.pending_window_in_days = key.pending_window_in_days
    return response


async def cancel_key_deletion(
    kms: Kms, request: pb.CancelKeyDeletionRequest, caller: Caller
) -> pb.CancelKeyDeletionResponse:
    key_id = await _key_id(kms, caller, request, request.key_id, "CancelKeyDeletion")
    command = kms.command(request, caller.principal)
    command.cancel_key_deletion.key_id = key_id
    committed = await kms.propose(command)
    return pb.CancelKeyDeletionResponse(
        key_id=kms.names.key_arn(committed.key_id), commit_index=committed.commit_index
    )
