"""Stored records rendered as API messages (KeyMetadata, AliasListEntry, GrantListEntry,
timestamps)."""

from __future__ import annotations

import functools
import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.auth.policy import root_arn
from kmsd.crypto.keygen import material_id
from kmsd.service.names import Names


def timestamp(ms: int) -> Timestamp:
    """A protobuf Timestamp for milliseconds since the epoch."""
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def current_material_id(key: fsm.KeyRecord) -> str:
    return _material_id(key.key_id, key.materials[-1].version)


# Rendered with every KeyMetadata (Describe/List/Create...): a SHA-256 and a UUID parse
# per call otherwise.
@functools.lru_cache(maxsize=4096)
def _material_id(key_id: str, version: int) -> str:
    return material_id(uuid.UUID(key_id), version)


def key_metadata(names: Names, key: fsm.KeyRecord) -> res.KeyMetadata:
    meta = res.KeyMetadata(
        key_id=key.key_id,
        arn=names.key_arn(key.key_id),
        aws_account_id=names.account,
        creation_date=timestamp(key.creation_ms),
        enabled=key.key_state == res.KEY_STATE_ENABLED,
        description=key.description,
        key_usage=key.key_usage,
        key_state=key.key_state,
        origin=key.origin,
        key_manager=res.KEY_MANAGER_CUSTOMER,
        key_spec=key.key_spec,
        encryption_algorithms=[res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT],
        multi_region=False,
        current_key_material_id=current_material_id(key),
    )
    if key.key_state == res.KEY_STATE_PENDING_DELETION:
        meta.deletion_date.CopyFrom(timestamp(key.deletion_date_ms))
        meta.pending_deletion_window_in_days = key.pending_window_in_days
    return meta


def alias_entry(names: Names, alias: fsm.AliasRecord) -> res.AliasListEntry:
    return res.AliasListEntry(
        alias_name=alias.alias_name,
        alias_arn=names.alias_arn(alias.alias_name),
        target_key_id=alias.target_key_id,
        creation_date=timestamp(alias.creation_ms),
        last_updated_date=timestamp(alias.last_updated_ms),
    )


def grant_entry(names: Names, grant: fsm.GrantRecord) -> res.GrantListEntry:
    entry = res.GrantListEntry(
        key_id=grant.key_id,
        grant_id=grant.grant_id,
        name=grant.name,
        creation_date=timestamp(grant.creation_ms),
        grantee_principal=grant.grantee_principal,
        retiring_principal=grant.retiring_principal,
        issuing_account=root_arn(names.account),
        operations=grant.operations,
        issuing_principal=grant.issuing_principal,
    )
    if grant.HasField("constraints"):
        entry.constraints.CopyFrom(grant.constraints)
    return entry
