"""Node ids are never reused, through the real ClusterService over gRPC on an
in-process cluster: a removed id is refused with INVALID_ARGUMENT naming node_id on
any node, nothing stops, and the refusal survives snapshots, restarts and snapshots
installed over the wire."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cluster_helpers import FAST, Cluster, run, until
from google.rpc import error_details_pb2, status_pb2
from kms.raft.v1 import wal_pb2
from kms.v1 import cluster_service_pb2 as cpb
from kms.v1 import cluster_service_pb2_grpc as cpb_grpc

from kmsd.api.cluster import ClusterServicer
from kmsd.errors import ValidationError
from kmsd.log.raft_disk import Member, RaftDisk
from kmsd.log.raft_log import RaftLog
from kmsd.raft import ConfChange, ConfState, HardState, Message, MessageType, Snapshot, SnapshotMeta
from kmsd.transport.codec import message_from_proto, message_to_proto
from kmsd.transport.inmem import InMemoryNetwork

SNAPSHOTTING = dataclasses.replace(FAST, snapshot_every=8, trailing_entries=2)


@asynccontextmanager
async def cluster_service(node: RaftLog) -> AsyncIterator[cpb_grpc.ClusterServiceStub]:
    """`node`'s ClusterService on a loopback port (plaintext, no operator check)."""
    server = grpc.aio.server()
    cpb_grpc.add_ClusterServiceServicer_to_server(
        ClusterServicer(node, node.node_id, f"client-{node.node_id}"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield cpb_grpc.ClusterServiceStub(channel)
    finally:
        await server.stop(None)


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations of a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [(v.field, v.description) for v in bad.field_violations]
    return []


async def refused(call: object) -> tuple[grpc.StatusCode, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), field_violations(info.value)


async def add(stub: cpb_grpc.ClusterServiceStub, node_id: int) -> object:
    return await stub.AddMember(
        cpb.AddMemberRequest(
            node_id=node_id, peer_address=f"peer-{node_id}:1", client_address=f"c-{node_id}:2"
        )
    )


async def assert_add_refused(stub: cpb_grpc.ClusterServiceStub, node_id: int) -> None:
    code, violations = await refused(add(stub, node_id))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations
    assert field == "node_id"
    assert f"node {node_id} was removed" in description and "never reused" in description


async def writes_everywhere(cluster: Cluster, tag: bytes) -> None:
    """Every running node accepts a write (forwarded to the leader if need be)."""
    for node_id, node in cluster.nodes.items():
        assert node.failure is None, f"node {node_id} stopped: {node.failure}"
        await node.propose(tag + b"-%d" % node_id)


def test_adding_a_removed_id_is_refused_naming_node_id_and_nothing_stops(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        victim = max(i for i in cluster.nodes if i != leader.node_id)
        async with cluster_service(leader) as stub:
            await stub.RemoveMember(cpb.RemoveMemberRequest(node_id=victim))
        await cluster.stop(victim)
        await until(
            lambda: all(victim in n.status().conf.removed for n in cluster.nodes.values()),
            "every node to apply the removal",
        )
        for node in list(cluster.nodes.values()):  # the leader and the follower alike
            async with cluster_service(node) as stub:
                await assert_add_refused(stub, victim)
                # The other membership mistakes are refused the same way.
                member = next(iter(cluster.nodes))
                code, violations = await refused(add(stub, member))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert [f for f, _ in violations] == ["node_id"]
                for node_id in (victim, 99):
                    code, violations = await refused(
                        stub.RemoveMember(cpb.RemoveMemberRequest(node_id=node_id))
                    )
                    assert code == grpc.StatusCode.INVALID_ARGUMENT
                    assert [f for f, _ in violations] == ["node_id"]
        # Nothing was proposed, nothing stopped, and every node still serves writes.
        assert all(victim not in n.members for n in cluster.nodes.values())
        await writes_everywhere(cluster, b"after")
        async with cluster_service(leader) as stub:
            status = await stub.GetClusterStatus(cpb.GetClusterStatusRequest())
        assert sorted(m.node_id for m in status.members) == sorted(cluster.nodes)

    run(scenario, tmp_path)


def test_a_removed_id_is_still_refused_after_a_snapshot_and_a_restart(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        victim = max(i for i in cluster.nodes if i != leader.node_id)
        removed_at = await leader.remove_member(victim)
        await cluster.stop(victim)
        for i in range(3 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"fill-%d" % i)
        survivors = sorted(cluster.nodes)
        await until(
            lambda: all(cluster.nodes[i].snapshot_index > removed_at for i in survivors),
            "snapshots taken after the removal",
        )
        # Restart every survivor: each starts from its snapshot, so the removal entry
        # is not replayed (nothing in memory remembers it).
        for node_id in survivors:
            await cluster.stop(node_id)
        for node_id in survivors:
            await cluster.start(node_id)
        for node_id in survivors:
            assert cluster.nodes[node_id].status().conf.removed == frozenset({victim})
        leader = await cluster.leader()
        async with cluster_service(leader) as stub:
            await assert_add_refused(stub, victim)
        # The leader's own proposal check refuses it too (no ClusterService check).
        with pytest.raises(ValidationError, match="never reused"):
            await leader.add_member(cluster.founders[victim - 1])
        await writes_everywhere(cluster, b"restarted")

    run(scenario, tmp_path, settings=SNAPSHOTTING)


class WireSnapshots(InMemoryNetwork):
    """Snapshots travel as the gRPC transport sends them: metadata through the wire
    codec, the data (a ClusterSnapshot) as is."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots_to: list[int] = []

    def deliver(self, message: Message) -> None:
        if message.type == MessageType.SNAPSHOT and message.snapshot is not None:
            wire = message_from_proto(message_to_proto(message), message.snapshot.data)
            assert wire.snapshot is not None
            meta = wire.snapshot.meta
            assert meta.conf.removed == message.snapshot.meta.conf.removed, "the codec carries them"
            message = wire
            if self.linked(message.src, message.dst):
                self.snapshots_to.append(message.dst)
        super().deliver(message)


def test_a_follower_installing_a_snapshot_from_the_wire_refuses_the_removed_ids(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        behind, victim = sorted(i for i in cluster.nodes if i != leader.node_id)[:2]
        cluster.network.isolate(behind)
        removed_at = await leader.remove_member(victim)
        await cluster.stop(victim)
        for i in range(3 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"fill-%d" % i)
        await until(lambda: leader.snapshot_index > removed_at, "a snapshot after the removal")
        follower = cluster.nodes[behind]
        assert follower.applied_index < removed_at
        cluster.network.heal()
        network = cluster.network
        assert isinstance(network, WireSnapshots)
        await until(lambda: behind in network.snapshots_to, "a snapshot sent to the follower")
        await until(lambda: follower.snapshot_index > removed_at, "the snapshot installed")
        # It never applied the removal entry (compacted away): the snapshot's data told.
        assert victim in follower.status().conf.removed
        async with cluster_service(follower) as stub:
            await assert_add_refused(stub, victim)
        await writes_everywhere(cluster, b"healed")

    run(scenario, tmp_path, size=4, settings=SNAPSHOTTING, network=WireSnapshots())


def test_a_committed_re_add_of_a_removed_id_is_skipped_everywhere_and_the_caller_told(
    tmp_path: Path,
) -> None:
    """A change for a removed id that commits anyway (here: the leader's checks before
    proposing, the log's and the core's, are bypassed, as for a leader that had
    forgotten the removal) is skipped on every node, the proposer gets an error naming
    node_id, and nothing stops."""

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        victim = max(i for i in cluster.nodes if i != leader.node_id)
        await leader.remove_member(victim)
        await cluster.stop(victim)
        membership = leader._raw._raft.membership  # type: ignore[union-attr]
        real_refusal = membership.refusal
        bypassed: list[ConfChange] = []

        def refuse_nothing_before_proposing(change: ConfChange) -> str | None:
            if len(bypassed) < 2:
                bypassed.append(change)
                return None
            return real_refusal(change)

        membership.refusal = refuse_nothing_before_proposing  # type: ignore[method-assign]
        with pytest.raises(ValidationError, match="skipped: node .* was removed") as info:
            await leader.add_member(Member(victim, "peer-x", "client-x"))
        assert [v.field for v in info.value.violations] == ["node_id"]
        assert len(bypassed) == 2
        for node_id, node in cluster.nodes.items():
            await until(lambda n=node: n.applied_index >= leader.applied_index, "apply")
            conf = node.status().conf
            assert victim in conf.removed, node_id
            assert victim not in conf.voters | conf.learners, node_id
            assert victim not in node.members, node_id
        await writes_everywhere(cluster, b"after-skip")

    run(scenario, tmp_path)


@pytest.mark.parametrize(
    ("conf", "removed"),
    [
        # Written before removed ids were recorded: no field 3 in ConfState.
        (wal_pb2.ConfState(voters=[1, 2], learners=[4]), frozenset()),
        (wal_pb2.ConfState(voters=[1, 2], learners=[4], removed=[3, 5]), frozenset({3, 5})),
    ],
)
def test_snapshot_files_round_trip_removed_ids_and_old_ones_still_load(
    tmp_path: Path, conf: wal_pb2.ConfState, removed: frozenset[int]
) -> None:
    data = wal_pb2.ClusterSnapshot(state=b"state", conf=conf).SerializeToString()
    disk = RaftDisk(tmp_path)
    disk.open()
    meta = SnapshotMeta(7, 2, ConfState(frozenset({1, 2}), frozenset({4})))
    disk.persist(Snapshot(meta, data), [], HardState(term=2, vote=1, commit=7), True)
    disk.close()
    reopened = RaftDisk(tmp_path)
    storage, fresh = reopened.open()
    reopened.close()
    assert not fresh
    loaded = storage.snapshot()
    assert (loaded.meta.index, loaded.meta.term, loaded.data) == (7, 2, data)
    assert loaded.meta.conf == ConfState(frozenset({1, 2}), frozenset({4}), removed)
    assert storage.initial_state()[1].removed == removed


def test_a_node_snapshot_records_the_removed_ids(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        victim = max(i for i in cluster.nodes if i != leader.node_id)
        removed_at = await leader.remove_member(victim)
        for i in range(2 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"fill-%d" % i)
        await until(lambda: leader.snapshot_index > removed_at, "a snapshot after the removal")
        assert leader._storage is not None
        data = leader._storage.snapshot().data
        cluster_snapshot = wal_pb2.ClusterSnapshot.FromString(data)
        assert list(cluster_snapshot.conf.removed) == [victim]
        assert victim not in {m.id for m in cluster_snapshot.members}

    run(scenario, tmp_path, settings=SNAPSHOTTING)
