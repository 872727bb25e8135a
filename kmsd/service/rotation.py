"""Key rotation: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations. Automatic rotations are proposed by the scheduler."""

from __future__ import annotations

import uuid

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.auth.authorizer import Caller
from kmsd.crypto.keygen import material_id
from kmsd.fsm.store import DEFAULT_ROTATION_PERIOD_DAYS
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.paging import page
from kmsd.service.views import timestamp


async def enable_key_rotation(
    kms: Kms, request: pb.EnableKeyRotationRequest, caller: Caller
) -> pb.EnableKeyRotationResponse:
    validate.request_id(request.request_id)
    period = request.rotation_period_in_days or DEFAULT_ROTATION_PERIOD_DAYS
    validate.in_range("rotation_period_in_days", period, 90, 2560)
    key = await access.key_for_write(
        kms, caller, request.key_id, "kms:EnableKeyRotation", request=request
    )
    command = kms.command(request, caller.principal)
    command.enable_key_rotation.CopyFrom(
        fsm.EnableKeyRotation(key_id=key.key_id, rotation_period_in_days=period)
    )
    committed = await kms.propose(command)
    return pb.EnableKeyRotationResponse(commit_index=committed.commit_index)


async def disable_key_rotation(
    kms: Kms, request: pb.DisableKeyRotationRequest, caller: Caller
) -> pb.DisableKeyRotationResponse:
    validate.request_id(request.request_id)
    key = await access.key_for_write(
        kms, caller, request.key_id, "kms:DisableKeyRotation", request=request
    )
    command = kms.command(request, caller.principal)
    command.disable_key_rotation.key_id = key.key_id
    committed = await kms.propose(command)
    return pb.DisableKeyRotationResponse(commit_index=committed.commit_index)


async def get_key_rotation_status(
    kms: Kms, request: pb.GetKeyRotationStatusRequest, caller: Caller
) -> pb.GetKeyRotationStatusResponse:
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:GetKeyRotationStatus", request.min_commit_index
    )
    response = pb.GetKeyRotationStatusResponse(
        key_rotation_enabled=key.rotation_enabled, key_id=key.key_id
    )
    if key.rotation_enabled:
        response.rotation_period_in_days = key.rotation_period_in_days
        response.next_rotation_date.CopyFrom(timestamp(key.next_rotation_ms))
    return response


async def rotate_key_on_demand(
    kms: Kms, request: pb.RotateKeyOnDemandRequest, caller: Caller
) -> pb.RotateKeyOnDemandResponse:
    validate.request_id(request.request_id)
    key = await access.key_for_write(
        kms, caller, request.key_id, "kms:RotateKeyOnDemand", request=request
    )
    version = key.materials[-1].version + 1
    command = kms.command(request, caller.principal)
    command.rotate_key.CopyFrom(
        fsm.RotateKey(
            key_id=key.key_id,
            version=version,
            wrapped_material=kms.new_wrapped_material(key.key_id, version),
            rotation_type=res.ROTATION_TYPE_ON_DEMAND,
        )
    )
    committed = await kms.propose(command)
    return pb.RotateKeyOnDemandResponse(
        key_id=committed.key_id, commit_index=committed.commit_index
    )


async def list_key_rotations(
    kms: Kms, request: pb.ListKeyRotationsRequest, caller: Caller
) -> pb.ListKeyRotationsResponse:
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:ListKeyRotations", request.min_commit_index
    )
    key_uuid = uuid.UUID(key.key_id)
    # ALL_KEY_MATERIAL lists the key's first material too; the default lists rotations only.
    everything = request.include_key_material == pb.INCLUDE_KEY_MATERIAL_ALL_KEY_MATERIAL
    rotations = [m for m in key.materials if everything or m.version > 1]
    chosen, next_marker = page(
        rotations,
        lambda m: f"{m.version:010d}",
        f"rotations/{key.key_id}",
        request.limit,
        request.marker,
    )
    return pb.ListKeyRotationsResponse(
        rotations=[
            res.RotationsListEntry(
                key_id=key.key_id,
                rotation_date=timestamp(m.create_ms),
                rotation_type=m.rotation_type,
                key_material_id=material_id(key_uuid, m.version),
            )
            for m in chosen
        ],
        next_marker=next_marker,
        truncated=bool(next_marker),
    )
