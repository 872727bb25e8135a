"""Malformed, out-of-term and impersonating Raft peer traffic is refused without harm:
the cluster keeps its leader, keeps serving, and no node crashes or logs a traceback.
The peer port is mutual TLS: only a member's certificate gets in, and a member may
only speak for itself."""

from __future__ import annotations

import random
import tomllib
from collections.abc import Iterator

import grpc
import pytest
from kms.raft.v1 import raft_service_pb2 as wire
from kms.raft.v1 import raft_service_pb2_grpc as wire_grpc
from kms.raft.v1 import wal_pb2
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kms_client.cluster import ClusterClient
from kmsd.auth import certs
from kmsd_process import KmsdProcess

SEED = 20261128


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsdProcess]:
    process = KmsdProcess(tmp_path_factory.mktemp("peerfuzz") / "dev", nodes=3).start()
    yield process
    process.stop()


def _peer_addresses(cluster: KmsdProcess) -> list[str]:
    config = tomllib.loads((cluster.data_dir / "node-1.toml").read_text())
    return [m["peer_address"] for m in config["cluster"]["members"]]


def _random_message(rng: random.Random) -> wire.Message:
    """Garbage, or a message from a non-member (any term), or a stale one from a member
    (terms 0 and 1 are over once the founding cluster elected its first leader).
    Current messages claiming another member are `test_a_member_cannot_speak_for_another`."""
    sender = rng.choice([0, 1, 2, 3, 7, 2**64 - 1])
    member = sender in (1, 2, 3)
    message = wire.Message(
        type=rng.choice([*range(14), 99]),  # type: ignore[arg-type]
        to=rng.choice([0, 1, 2, 3, 4, 2**63]),
        term=rng.choice([0, 1] if member else [0, 1, 2, 10**6, 2**64 - 1]),
        log_term=rng.choice([0, 1, 2**64 - 1]),
        index=rng.choice([0, 1, 5, 10**9, 2**64 - 1]),
        commit=rng.choice([0, 1, 10**9, 2**64 - 1]),
        reject=rng.random() < 0.5,
        reject_hint=rng.choice([0, 3, 2**64 - 1]),
        context=rng.randbytes(rng.choice([0, 8, 300])),
    )
    setattr(message, "from", sender)
    for _ in range(rng.choice([0, 0, 1, 3])):
        message.entries.append(
            wal_pb2.Entry(
                index=rng.choice([0, 1, 2, 10**9]),
                term=rng.choice([0, 1, 2**64 - 1]),
                type=rng.choice([0, 1, 2, 3, 42]),  # type: ignore[arg-type]
                data=rng.randbytes(rng.choice([0, 5, 64])),
            )
        )
    if rng.random() < 0.2:
        message.snapshot.CopyFrom(wire.SnapshotMetadata(index=rng.choice([0, 10**9]), term=1))
    return message


def _channel_as(cluster: KmsdProcess, address: str, files: certs.CertFiles) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cluster.ca_path.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def test_the_peer_port_admits_only_member_certificates(cluster: KmsdProcess) -> None:
    address = _peer_addresses(cluster)[0]
    request = wire.SendRequest(cluster_id="kmsd-dev")
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plain:
        wire_grpc.RaftServiceStub(channel).Send(request, timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS handshake
    # A client certificate from the same CA is a caller, not a peer.
    with _channel_as(cluster, address, certs.client_files(cluster.tls_dir, "admin")) as channel:
        stub = wire_grpc.RaftServiceStub(channel)
        for call in (
            lambda: stub.Send(request, timeout=5),
            lambda: stub.Propose(wire.ProposeRequest(cluster_id="kmsd-dev"), timeout=5),
            lambda: stub.SendStream(iter([request]), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A node's own certificate presented back to it is not a peer either.
    with _channel_as(cluster, address, certs.node_files(cluster.tls_dir, 1)) as channel:
        with pytest.raises(grpc.RpcError) as itself:
            wire_grpc.RaftServiceStub(channel).Send(request, timeout=5)
        assert itself.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_member_cannot_speak_for_another(cluster: KmsdProcess) -> None:
    """Member j, with its own certificate, tells follower i "campaign now" in the
    leader's name (TIMEOUT_NOW, the current term). Believed, it would start an
    election; the sender check drops it."""
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        before = client.node_status(cluster.endpoint)
    leader = before.leader_id
    target, insider = [n for n in (1, 2, 3) if n != leader]
    forged = wire.Message(type=wire.MESSAGE_TYPE_TIMEOUT_NOW, to=target, term=before.term)
    setattr(forged, "from", leader)
    address = _peer_addresses(cluster)[target - 1]
    with _channel_as(cluster, address, certs.node_files(cluster.tls_dir, insider)) as channel:
        wire_grpc.RaftServiceStub(channel).Send(
            wire.SendRequest(cluster_id="kmsd-dev", messages=[forged]), timeout=5
        )
    # A write through the target commits after the forged message was handled.
    with cluster.channel(cluster.endpoints[target - 1]) as channel:
        made = pb_grpc.KeyManagementServiceStub(channel).CreateKey(
            pb.CreateKeyRequest(description="after the forgery")
        )
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        after = [client.node_status(e) for e in cluster.endpoints]
    assert all(s.term == before.term and s.leader_id == leader for s in after)
    assert made.commit_index > 0


def test_random_peer_messages_do_no_harm(cluster: KmsdProcess) -> None:
    print(f"peer fuzz seed={SEED}")
    rng = random.Random(SEED)
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        before = client.node_status(cluster.endpoint)
    for position, address in enumerate(_peer_addresses(cluster)):
        # As another member (its certificate): what gets past the TLS handshake.
        insider = (position + 1) % 3 + 1
        with _channel_as(cluster, address, certs.node_files(cluster.tls_dir, insider)) as channel:
            stub = wire_grpc.RaftServiceStub(channel)
            for _ in range(150):
                request = wire.SendRequest(
                    cluster_id=rng.choice(["kmsd-dev", "kmsd-dev", "other"]),
                    messages=[_random_message(rng) for _ in range(rng.choice([1, 4]))],
                )
                try:
                    stub.Send(request, timeout=5)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            raw = channel.unary_unary("/kms.raft.v1.RaftService/Send")
            for garbage in (b"\xff\xff", b"\x12\x05\x08", rng.randbytes(64)):
                with pytest.raises(grpc.RpcError):
                    raw(garbage, timeout=5)
            with pytest.raises(grpc.RpcError):
                stub.Propose(wire.ProposeRequest(cluster_id="other", command=b"x"), timeout=5)
    # Still one cluster, serving, and every node converges on a new write.
    stub = cluster.stub()
    made = stub.CreateKey(pb.CreateKeyRequest(description="after fuzz"))
    with ClusterClient(cluster.endpoints, tls=cluster.tls_files()) as client:
        statuses = [client.node_status(e) for e in cluster.endpoints]
    assert len({s.leader_id for s in statuses}) == 1 and statuses[0].leader_id != 0
    assert statuses[0].term == before.term  # the fuzz caused no election
    for endpoint in cluster.endpoints:
        with cluster.channel(endpoint) as channel:
            found = pb_grpc.KeyManagementServiceStub(channel).DescribeKey(
                pb.DescribeKeyRequest(
                    key_id=made.key_metadata.key_id, min_commit_index=made.commit_index
                )
            )
            assert found.key_metadata.description == "after fuzz"
    for log in cluster.data_dir.glob("node-*.log"):
        assert "Traceback" not in log.read_text(), log
