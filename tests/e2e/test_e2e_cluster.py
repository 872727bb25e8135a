"""A real 3-node cluster (`kmsd dev --nodes 3`): any node answers any request, writes
on followers are forwarded, read-your-writes with min_commit_index, ClusterService."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from audit_records import audit_records
from kms.v1 import cluster_service_pb2 as cpb
from kms.v1 import cluster_service_pb2_grpc as cpb_grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kms_client.cluster import ClusterClient
from kmsd_process import KmsdProcess


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsdProcess]:
    process = KmsdProcess(tmp_path_factory.mktemp("cluster") / "dev", nodes=3).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stubs(cluster: KmsdProcess) -> Iterator[list[pb_grpc.KeyManagementServiceStub]]:
    channels = [cluster.channel(e) for e in cluster.endpoints]
    yield [pb_grpc.KeyManagementServiceStub(c) for c in channels]
    for channel in channels:
        channel.close()


def _statuses(cluster: KmsdProcess) -> list[cpb.GetClusterStatusResponse]:
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        return [client.node_status(e) for e in cluster.endpoints]


def test_three_nodes_one_leader_same_term(cluster: KmsdProcess) -> None:
    statuses = _statuses(cluster)
    leaders = {s.leader_id for s in statuses}
    assert len(leaders) == 1 and 0 not in leaders
    assert sum(s.role == cpb.NODE_ROLE_LEADER for s in statuses) == 1
    assert {s.node_id for s in statuses} == {1, 2, 3}
    assert all(s.replicated and len(s.members) == 3 for s in statuses)


def test_every_node_answers_and_sees_writes_made_on_any_other(
    cluster: KmsdProcess, stubs: list[pb_grpc.KeyManagementServiceStub]
) -> None:
    leader_id = _statuses(cluster)[0].leader_id
    follower = next(i for i in range(3) if i + 1 != leader_id)
    created = stubs[follower].CreateKey(pb.CreateKeyRequest(description="via follower"))
    key_id = created.key_metadata.key_id
    assert created.commit_index > 0
    for stub in stubs:
        # Linearizable control-plane reads: no node may miss an acknowledged write.
        meta = stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_id)).key_metadata
        assert meta.description == "via follower"
    blob = (
        stubs[0]
        .Encrypt(pb.EncryptRequest(key_id=key_id, plaintext=b"x", encryption_context={"k": "v"}))
        .ciphertext_blob
    )
    for stub in stubs:
        out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"k": "v"}))
        assert out.plaintext == b"x"


def test_a_forwarded_write_is_audited_by_the_node_that_served_it(
    cluster: KmsdProcess, stubs: list[pb_grpc.KeyManagementServiceStub]
) -> None:
    """The follower that took the request records it, from its own apply of the entry
    (the audit draft travels in the command); the leader, which proposed it, does not."""
    leader_id = _statuses(cluster)[0].leader_id
    follower = next(i for i in range(3) if i + 1 != leader_id)
    request_id = str(uuid.uuid4())
    created = stubs[follower].CreateKey(pb.CreateKeyRequest(request_id=request_id))

    def records(node_id: int) -> list[dict[str, Any]]:
        return [
            r
            for r in audit_records(cluster.data_dir / f"node-{node_id}" / "audit")
            if r["request_id"] == request_id
        ]

    deadline = time.monotonic() + 10
    while not (served := records(follower + 1)) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling pace: the record is written right after the apply
    assert len(served) == 1, served
    (record,) = served
    assert (record["operation"], record["outcome"], record["node"]) == (
        "CreateKey",
        "ok",
        follower + 1,
    )
    assert record["key_arn"] == created.key_metadata.arn
    assert record["detail"]["log_index"] == created.commit_index
    assert records(leader_id) == []


def test_state_changes_apply_on_every_node(
    cluster: KmsdProcess, stubs: list[pb_grpc.KeyManagementServiceStub]
) -> None:
    key_id = stubs[0].CreateKey(pb.CreateKeyRequest()).key_metadata.key_id
    disabled = stubs[1].DisableKey(pb.DisableKeyRequest(key_id=key_id))
    for stub in stubs:
        with pytest.raises(grpc.RpcError) as info:
            stub.Encrypt(
                pb.EncryptRequest(
                    key_id=key_id, plaintext=b"x", min_commit_index=disabled.commit_index
                )
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_min_commit_index_gives_read_your_writes(
    cluster: KmsdProcess, stubs: list[pb_grpc.KeyManagementServiceStub]
) -> None:
    for writer in range(3):
        made = stubs[writer].CreateKey(pb.CreateKeyRequest(description=f"w{writer}"))
        for reader in stubs:
            listed = reader.ListKeys(
                pb.ListKeysRequest(limit=1000, min_commit_index=made.commit_index)
            )
            assert made.key_metadata.key_id in {k.key_id for k in listed.keys}


def test_idempotent_retry_on_another_node(
    cluster: KmsdProcess, stubs: list[pb_grpc.KeyManagementServiceStub]
) -> None:
    request = pb.CreateKeyRequest(description="once", request_id="retry-across-nodes")
    first = stubs[0].CreateKey(request)
    again = stubs[2].CreateKey(request)
    assert again.key_metadata.key_id == first.key_metadata.key_id
    assert again.commit_index == first.commit_index


def test_transfer_leadership(cluster: KmsdProcess) -> None:
    leader_id = _statuses(cluster)[0].leader_id
    target = 1 + leader_id % 3
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        client.transfer_leadership(target)
    assert {s.leader_id for s in _statuses(cluster)} == {target}


def test_membership_changes_need_the_leader_or_follow_it(cluster: KmsdProcess) -> None:
    statuses = _statuses(cluster)
    follower = next(s for s in statuses if s.role != cpb.NODE_ROLE_LEADER)
    endpoint = cluster.endpoints[follower.node_id - 1]
    with cluster.channel(endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        cpb_grpc.ClusterServiceStub(channel).RemoveMember(
            cpb.RemoveMemberRequest(node_id=follower.node_id)
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "leader" in (info.value.details() or "")


def test_kmsd_health_checks_a_node_as_itself(cluster: KmsdProcess) -> None:
    """`kmsd health --config` (the container health check): the node's own certificate."""
    done = subprocess.run(
        [sys.executable, "-m", "kmsd", "health", "--config", str(cluster.data_dir / "node-2.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"kmsd health: {cluster.endpoints[1]}: SERVING"
