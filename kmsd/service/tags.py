"""Tags on keys: TagResource, UntagResource, ListResourceTags."""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb

from kmsd.auth.authorizer import Caller
from kmsd.auth.conditions import ContextValue
from kmsd.errors import ValidationError
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.paging import page


async def tag_resource(
    kms: Kms, request: pb.TagResourceRequest, caller: Caller
) -> pb.TagResourceResponse:
    validate.request_id(request.request_id)
    if not request.tags:
        raise ValidationError("tags", "at least one tag is required")
    validate.tags(request.tags)
    # AWS's tag condition keys: aws:TagKeys and aws:RequestTag/<tag key>.
    extra: dict[str, ContextValue] = {"aws:tagkeys": [t.tag_key for t in request.tags]}
    extra.update({f"aws:requesttag/{t.tag_key.lower()}": t.tag_value for t in request.tags})
    key = await access.key_for_write(
        kms, caller, request.key_id, "kms:TagResource", extra=extra, request=request
    )
    command = kms.command(request, caller.principal)
    command.tag_resource.CopyFrom(fsm.TagResource(key_id=key.key_id, tags=request.tags))
    committed = await kms.propose(command)
    return pb.TagResourceResponse(commit_index=committed.commit_index)


async def untag_resource(
    kms: Kms, request: pb.UntagResourceRequest, caller: Caller
) -> pb.UntagResourceResponse:
    validate.request_id(request.request_id)
    if not request.tag_keys:
        raise ValidationError("tag_keys", "at least one tag key is required")
    for tag_key in request.tag_keys:
        validate.tag_key(tag_key)
    key = await access.key_for_write(
        kms,
        caller,
        request.key_id,
        "kms:UntagResource",
        extra={"aws:tagkeys": list(request.tag_keys)},
        request=request,
    )
    command = kms.command(request, caller.principal)
    command.untag_resource.CopyFrom(fsm.UntagResource(key_id=key.key_id, tag_keys=request.tag_keys))
    committed = await kms.propose(command)
    return pb.UntagResourceResponse(commit_index=committed.commit_index)


async def list_resource_tags(
    kms: Kms, request: pb.ListResourceTagsRequest, caller: Caller
) -> pb.ListResourceTagsResponse:
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:ListResourceTags", request.min_commit_index
    )
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
