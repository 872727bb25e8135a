"""End-to-end: TagResource, UntagResource and ListResourceTags over a real kmsd process."""

from __future__ import annotations

import uuid

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res
from test_e2e_errors import assert_kms_error, new_key

from kmsd_process import KmsdProcess

Code = grpc.StatusCode
Stub = pb_grpc.KeyManagementServiceStub


def _tag(stub: Stub, key_id: str, **tags: str) -> int:
    return stub.TagResource(
        pb.TagResourceRequest(
            key_id=key_id, tags=[res.Tag(tag_key=k, tag_value=v) for k, v in tags.items()]
        )
    ).commit_index


def _listed(stub: Stub, key_id: str) -> list[tuple[str, str]]:
    out = stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key_id))
    assert not out.truncated and not out.next_marker
    return [(t.tag_key, t.tag_value) for t in out.tags]


def test_new_key_has_no_tags(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    assert _listed(stub, new_key(stub).key_id) == []


def test_tag_overwrite_untag(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert _tag(stub, key.key_id, project="kmsd", env="dev", Owner="ops") > 0
    # Listed sorted by tag key (byte order: upper case first).
    assert _listed(stub, key.arn) == [("Owner", "ops"), ("env", "dev"), ("project", "kmsd")]
    # Tagging an existing tag key replaces its value; others are kept.
    _tag(stub, key.key_id, env="prod", empty="")
    assert _listed(stub, key.key_id) == [
        ("Owner", "ops"),
        ("empty", ""),
        ("env", "prod"),
        ("project", "kmsd"),
    ]
    # Tag keys are case-sensitive.
    _tag(stub, key.key_id, owner="dev")
    assert ("owner", "dev") in _listed(stub, key.key_id)
    assert ("Owner", "ops") in _listed(stub, key.key_id)
    out = stub.UntagResource(
        pb.UntagResourceRequest(key_id=key.arn, tag_keys=["env", "owner", "never-set"])
    )
    assert out.commit_index > 0
    assert _listed(stub, key.key_id) == [("Owner", "ops"), ("empty", ""), ("project", "kmsd")]


def test_tags_are_per_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    a, b = new_key(stub), new_key(stub)
    _tag(stub, a.key_id, only="a")
    assert _listed(stub, b.key_id) == []


def test_list_resource_tags_pages(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _tag(stub, key.key_id, **{f"t{n}": str(n) for n in range(5)})
    seen: list[str] = []
    marker = ""
    pages = 0
    while True:
        out = stub.ListResourceTags(
            pb.ListResourceTagsRequest(key_id=key.key_id, limit=2, marker=marker)
        )
        pages += 1
        assert len(out.tags) <= 2
        seen.extend(t.tag_key for t in out.tags)
        assert out.truncated == bool(out.next_marker)
        if not out.truncated:
            break
        marker = out.next_marker
    assert seen == [f"t{n}" for n in range(5)]
    assert pages == 3


def test_list_resource_tags_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    for limit in (-1, 51):
        assert_kms_error(
            lambda limit=limit: stub.ListResourceTags(
                pb.ListResourceTagsRequest(key_id=key.key_id, limit=limit)
            ),
            Code.INVALID_ARGUMENT,
            "ValidationException",
            field="limit",
        )
    assert_kms_error(
        lambda: stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=key.key_id, marker="zz")),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
        field="marker",
    )
    assert_kms_error(
        lambda: stub.ListResourceTags(pb.ListResourceTagsRequest(key_id=str(uuid.uuid4()))),
        Code.NOT_FOUND,
        "NotFoundException",
    )


@pytest.mark.parametrize(
    ("tag", "field"),
    [
        (res.Tag(tag_key="aws:createdBy", tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="", tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="k" * 129, tag_value="x"), "tags.tag_key"),
        (res.Tag(tag_key="k", tag_value="v" * 257), "tags.tag_value"),
    ],
)
def test_bad_tags_are_tag_exceptions(kmsd: KmsdProcess, tag: res.Tag, field: str) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.TagResource(pb.TagResourceRequest(key_id=key.key_id, tags=[tag])),
        Code.INVALID_ARGUMENT,
        "TagException",
        field=field,
    )
    assert _listed(stub, key.key_id) == []


def test_longest_tag_key_and_value_are_accepted(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _tag(stub, key.key_id, **{"k" * 128: "v" * 256})
    assert _listed(stub, key.key_id) == [("k" * 128, "v" * 256)]


def test_untag_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    for tag_key in ("aws:reserved", "", "k" * 129):
        assert_kms_error(
            lambda tag_key=tag_key: stub.UntagResource(
                pb.UntagResourceRequest(key_id=key.key_id, tag_keys=[tag_key])
            ),
            Code.INVALID_ARGUMENT,
            "TagException",
            field="tag_keys",
        )
    assert_kms_error(
        lambda: stub.UntagResource(pb.UntagResourceRequest(key_id=key.key_id)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="tag_keys",
    )
    assert_kms_error(
        lambda: stub.TagResource(pb.TagResourceRequest(key_id=key.key_id)),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="tags",
    )
    assert_kms_error(
        lambda: stub.UntagResource(
            pb.UntagResourceRequest(key_id=str(uuid.uuid4()), tag_keys=["a"])
        ),
        Code.NOT_FOUND,
        "NotFoundException",
    )


def test_at_most_50_tags_per_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _tag(stub, key.key_id, **{f"k{n:02d}": "v" for n in range(50)})
    assert len(_listed(stub, key.key_id)) == 50
    assert_kms_error(
        lambda: _tag(stub, key.key_id, extra="v"),
        Code.RESOURCE_EXHAUSTED,
        "LimitExceededException",
    )
    # Overwriting existing tags is not adding any.
    _tag(stub, key.key_id, k00="new")
    assert ("k00", "new") in _listed(stub, key.key_id)
    # 51 at once on an untagged key fails too, and leaves nothing behind.
    other = new_key(stub)
    assert_kms_error(
        lambda: _tag(stub, other.key_id, **{f"k{n:02d}": "v" for n in range(51)}),
        Code.RESOURCE_EXHAUSTED,
        "LimitExceededException",
    )
    assert _listed(stub, other.key_id) == []
    # After an untag there is room again.
    stub.UntagResource(pb.UntagResourceRequest(key_id=key.key_id, tag_keys=["k49"]))
    _tag(stub, key.key_id, extra="v")
    assert len(_listed(stub, key.key_id)) == 50


def test_tags_of_a_key_pending_deletion(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _tag(stub, key.key_id, keep="me")
    stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=key.key_id))
    assert_kms_error(
        lambda: _tag(stub, key.key_id, more="x"),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    assert_kms_error(
        lambda: stub.UntagResource(pb.UntagResourceRequest(key_id=key.key_id, tag_keys=["keep"])),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    assert _listed(stub, key.key_id) == [("keep", "me")]


def test_tags_survive_a_restart(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _tag(stub, key.key_id, a="1", b="2")
    stub.UntagResource(pb.UntagResourceRequest(key_id=key.key_id, tag_keys=["a"]))
    kmsd.stop()
    kmsd.restart()
    assert _listed(kmsd.stub(), key.key_id) == [("b", "2")]
