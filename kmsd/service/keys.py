"""Key lifecycle operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription,
EnableKey, DisableKey, ScheduleKeyDeletion, CancelKeyDeletion."""

from __future__ import annotations

import uuid

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.errors import (
    InternalError,
    LimitExceededError,
    UnsupportedOperationError,
    ValidationError,
)
from kmsd.fsm.store import MAX_TAGS_PER_KEY
from kmsd.service import validate
from kmsd.service.context import Kms
from kmsd.service.paging import page
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
    # Key policies are not enforced yet: storing one would promise protection kmsd
    # does not give, so it is refused until policies are evaluated.
    for name in ("policy", "bypass_policy_lockout_safety_check"):
        if getattr(request, name):
            raise UnsupportedOperationError(f"{name}: key policies are not supported yet.")
    for name in ("custom_key_store_id", "xks_key_id", "multi_region"):
        if getattr(request, name):
            raise UnsupportedOperationError(f"{name} is not supported.")


async def create_key(kms: Kms, request: pb.CreateKeyRequest) -> pb.CreateKeyResponse:
    validate.request_id(request.request_id)
    validate.description(request.description)
    _unsupported_create_options(request)
    validate.tags(request.tags)
    if len(request.tags) > MAX_TAGS_PER_KEY:
        raise LimitExceededError(
            f"A key may have at most {MAX_TAGS_PER_KEY} tags; {len(request.tags)} were given."
        )
    key_id = str(uuid.UUID(bytes=kms.rng(16), version=4))
    command = kms.command(request)
    command.create_key.CopyFrom(
        fsm.CreateKey(
            key_id=key_id,
            description=request.description,
            key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
            key_usage=res.KEY_USAGE_ENCRYPT_DECRYPT,
            origin=res.ORIGIN_AWS_KMS,
            wrapped_material=kms.new_wrapped_material(key_id, 1),
            tags=request.tags,
        )
    )
    committed = await kms.propose(command)
    key = kms.store.key(committed.key_id)
    if key is None:
        raise InternalError("the new key is missing after commit")
    return pb.CreateKeyResponse(
        key_metadata=key_metadata(kms.names, key), commit_index=committed.commit_index
    )


async def describe_key(kms: Kms, request: pb.DescribeKeyRequest) -> pb.DescribeKeyResponse:
    validate.grant_tokens(request.grant_tokens)
    await kms.read(request.min_commit_index)
    key = kms.names.resolve(kms.store, request.key_id)
    return pb.DescribeKeyResponse(key_metadata=key_metadata(kms.names, key))


async def list_keys(kms: Kms, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
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


async def _key_id(kms: Kms, key_ref: str, request_id: str) -> str:
    validate.request_id(request_id)
    return (await kms.resolve_for_write(key_ref)).key_id


async def update_key_description(
    kms: Kms, request: pb.UpdateKeyDescriptionRequest
) -> pb.UpdateKeyDescriptionResponse:
    validate.description(request.description)
    command = kms.command(request)
    command.update_key_description.CopyFrom(
        fsm.UpdateKeyDescription(
            key_id=await _key_id(kms, request.key_id, request.request_id),
            description=request.description,
        )
    )
    committed = await kms.propose(command)
    return pb.UpdateKeyDescriptionResponse(commit_index=committed.commit_index)


async def enable_key(kms: Kms, request: pb.EnableKeyRequest) -> pb.EnableKeyResponse:
    command = kms.command(request)
    command.enable_key.key_id = await _key_id(kms, request.key_id, request.request_id)
    committed = await kms.propose(command)
    return pb.EnableKeyResponse(commit_index=committed.commit_index)


async def disable_key(kms: Kms, request: pb.DisableKeyRequest) -> pb.DisableKeyResponse:
    command = kms.command(request)
    command.disable_key.key_id = await _key_id(kms, request.key_id, request.request_id)
    committed = await kms.propose(command)
    return pb.DisableKeyResponse(commit_index=committed.commit_index)


async def schedule_key_deletion(
    kms: Kms, request: pb.ScheduleKeyDeletionRequest
) -> pb.ScheduleKeyDeletionResponse:
    window = request.pending_window_in_days or DEFAULT_PENDING_WINDOW_DAYS
    validate.in_range("pending_window_in_days", window, 7, 30)
    command = kms.command(request)
    command.schedule_key_deletion.CopyFrom(
        fsm.ScheduleKeyDeletion(
            key_id=await _key_id(kms, request.key_id, request.request_id),
            pending_window_in_days=window,
        )
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
    kms: Kms, request: pb.CancelKeyDeletionRequest
) -> pb.CancelKeyDeletionResponse:
    command = kms.command(request)
    command.cancel_key_deletion.key_id = await _key_id(kms, request.key_id, request.request_id)
    committed = await kms.propose(command)
    return pb.CancelKeyDeletionResponse(
        key_id=kms.names.key_arn(committed.key_id), commit_index=committed.commit_index
    )
