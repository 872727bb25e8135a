"""KmsClient failover and retries: only UNAVAILABLE, idempotent calls only, stable request_id."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms_fake import FakeCluster, FakeKms, Sleeps, make_status

from kms_client.client import KmsClient
from kms_client.errors import KMSInternalException, NotFoundException

NO_QUORUM = make_status(
    grpc.StatusCode.UNAVAILABLE,
    "no quorum",
    reason="UNAVAILABLE",
    aws_exception="KMSInternalException",
    retry_after=0.3,
)


def test_unavailable_first_endpoint_then_success_on_second(
    cluster: FakeCluster, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    a.fail_always(NO_QUORUM)
    b_key = b.do_CreateKey(pb.CreateKeyRequest())
    client = make_client([a.address, b.address])

    meta = client.describe_key(b_key.key_metadata.key_id).key_metadata

    assert meta.key_id == b_key.key_metadata.key_id
    assert len(a.calls_of("DescribeKey")) == 1
    assert len(b.calls_of("DescribeKey")) == 1
    # RetryInfo is a floor for the backoff.
    assert len(sleeps.delays) == 1 and sleeps.delays[0] >= 0.3
    # The client sticks with the node that answered.
    assert client.current_endpoint == b.address
    client.describe_key(b_key.key_metadata.key_id)
    assert len(a.calls_of("DescribeKey")) == 1


def test_dead_endpoint_fails_over(
    fake: FakeKms, dead_endpoint: str, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    client = make_client([dead_endpoint, fake.address])
    response = client.generate_random(4)
    assert response.plaintext == bytes(range(4))
    assert len(sleeps.delays) == 1
    assert client.current_endpoint == fake.address


def test_request_id_is_stable_across_retries(
    cluster: FakeCluster, make_client: Callable[..., KmsClient]
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    a.fail("CreateKey", NO_QUORUM)
    client = make_client([a.address, b.address])

    client.create_key("payments")

    (first,) = a.calls_of("CreateKey")
    (second,) = b.calls_of("CreateKey")
    assert first.request_id == second.request_id
    assert uuid.UUID(first.request_id).version == 4


def test_each_call_gets_a_fresh_request_id(fake: FakeKms, client: KmsClient) -> None:
    client.create_key()
    client.create_key()
    ids = [req.request_id for req in fake.calls_of("CreateKey")]
    assert len(set(ids)) == 2 and all(ids)


def test_explicit_request_id_is_sent(fake: FakeKms, client: KmsClient) -> None:
    client.enable_key("k1", request_id="my-id-1")
    assert fake.calls_of("EnableKey")[0].request_id == "my-id-1"


def test_mutation_without_request_id_is_not_retried(
    cluster: FakeCluster, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    a.fail("DisableKey", NO_QUORUM)
    client = make_client([a.address, b.address])

    with pytest.raises(KMSInternalException):
        client.disable_key("k1", request_id="")

    assert a.calls_of("DisableKey")[0].request_id == ""
    assert b.calls == []
    assert sleeps.delays == []


def test_other_codes_are_never_retried(
    cluster: FakeCluster, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    client = make_client([a.address, b.address])
    with pytest.raises(NotFoundException):
        client.describe_key("missing")
    assert len(a.calls) == 1 and b.calls == []
    assert sleeps.delays == []


def test_deadline_exceeded_is_not_retried(
    fake: FakeKms, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    fake.fail(
        "DescribeKey",
        make_status(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"),
    )
    client = make_client([fake.address])
    with pytest.raises(Exception) as info:
        client.describe_key("k1")
    assert getattr(info.value, "code", None) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert sleeps.delays == []


def test_gives_up_after_max_attempts_with_growing_backoff(
    fake: FakeKms, make_client: Callable[..., KmsClient], sleeps: Sleeps
) -> None:
    fake.fail_always(make_status(grpc.StatusCode.UNAVAILABLE, "down"))
    client = make_client([fake.address], max_attempts=4, initial_backoff=0.1, max_backoff=0.3)

    with pytest.raises(KMSInternalException) as info:
        client.encrypt("k1", b"x")

    assert info.value.retry_after is None
    assert len(fake.calls_of("Encrypt")) == 4
    assert len(sleeps.delays) == 3
    # Equal jitter: each delay lies in [step/2, step], step doubling up to max_backoff.
    for delay, step in zip(sleeps.delays, (0.1, 0.2, 0.3), strict=True):
        assert step / 2 <= delay <= step


def test_reads_retry_round_robin_over_all_endpoints(
    cluster: FakeCluster, make_client: Callable[..., KmsClient]
) -> None:
    nodes = [cluster.start(n) for n in "abc"]
    for node in nodes:
        node.fail_always(NO_QUORUM)
    client = make_client([n.address for n in nodes], max_attempts=4)
    with pytest.raises(KMSInternalException):
        client.list_keys()
    assert [len(n.calls) for n in nodes] == [2, 1, 1]


def test_leader_hint_is_tried_next(
    cluster: FakeCluster, make_client: Callable[..., KmsClient]
) -> None:
    a, b, leader = cluster.start("a"), cluster.start("b"), cluster.start("leader")
    a.fail(
        "CreateAlias",
        make_status(
            grpc.StatusCode.UNAVAILABLE,
            "not the leader",
            reason="NOT_LEADER",
            aws_exception="KMSInternalException",
            metadata={"leader_address": leader.address},
        ),
    )
    key = leader.do_CreateKey(pb.CreateKeyRequest())
    # The leader was not configured: the client learns it from the hint.
    client = make_client([a.address, b.address])

    client.create_alias("alias/x", key.key_metadata.key_id)

    assert b.calls == []
    assert len(leader.calls_of("CreateAlias")) == 1
    assert client.current_endpoint == leader.address
    assert leader.address in client.endpoints


def test_closed_client_refuses_calls(fake: FakeKms) -> None:
    with KmsClient(fake.address, plaintext=True) as client:
        client.generate_random(1)
    with pytest.raises(ValueError):
        client.generate_random(1)


def test_endpoint_list_parsing() -> None:
    client = KmsClient(["h1:1,h2:2", " h3:3 ", "h1:1"], plaintext=True)
    try:
        assert client.endpoints == ["h1:1", "h2:2", "h3:3"]
    finally:
        client.close()
    with pytest.raises(ValueError):
        KmsClient([], plaintext=True)
    with pytest.raises(ValueError):
        KmsClient("h:1", max_attempts=0, plaintext=True)
