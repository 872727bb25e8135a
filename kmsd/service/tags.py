"""Tags on keys: TagResource, UntagResource, ListResourceTags."""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb

from kmsd.errors import ValidationError
from kmsd.service import validate
from kmsd.service.context import Kms
from kmsd.service.paging import page


async def tag_resource(kms: Kms, request: pb.TagResourceRequest) -> pb.TagResourceResponse:
    validate.request_id(request.request_id)
    if not request.tags:
        raise ValidationError("tags", "at least one tag is required")
    validate.tags(request.tags)
    command = kms.command(request)
    command.tag_resource.CopyFrom(
        fsm.TagResource(
            key_id=(await kms.resolve_for_write(request.key_id)).key_id, tags=request.tags
        )
    )
    committed = await kms.propose(command)
    return pb.TagResourceResponse(commit_index=committed.commit_index)


async def untag_resource(kms: Kms, request: pb.UntagResourceRequest) -> pb.UntagResourceResponse:
    validate.request_id(request.request_id)
    if not request.tag_keys:
        raise ValidationError("tag_keys", "at least one tag key is required")
    for tag_key in request.tag_keys:
        validate.tag_key(tag_key)
    command = kms.command(request)
    command.untag_resource.CopyFrom(
        fsm.UntagResource(
            key_id=(await kms.resolve_for_write(request.key_id)).key_id,
            tag_keys=request.tag_keys,
        )
    )
    committed = await kms.propose(command)
    return pb.UntagResourceResponse(commit_index=committed.commit_index)


async def list_resource_tags(
    kms: Kms, request: pb.ListResourceTagsRequest
) -> pb.ListResourceTagsResponse:
    await kms.read(request.min_commit_index)
    key = kms.names.resolve(kms.store, request.key_id)
    chosen, next_marker = page(
        sorted(key.tags, key=lambda t: t.tag_key),
        lambda t: t.tag_key,
        f"tags/{key.key_id}",
        request.limit,
        request.marker,
        max_limit=50,
        default_limit=50,
    )
    return pb.ListResourceTagsResponse(
        tags=chosen, next_marker=next_marker, truncated=bool(next_marker)
    )
