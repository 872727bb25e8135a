"""A node's own snapshot is encoded and written on a thread while its Raft log goes on:
writes commit meanwhile, the snapshot is exactly the state it was frozen at, a newer
snapshot installed from the leader in the meantime wins over it, and its bytes are
what protobuf would write. What must be durable before a snapshot replaces entries
(`before_compaction`: the audit records of mutations) is, or no snapshot replaces them."""

from __future__ import annotations

import dataclasses
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import FAST, Cluster, ListMachine, run, until
from kms.raft.v1 import wal_pb2

from kmsd.errors import UnavailableError
from kmsd.log.raft_disk import Member, RaftDisk, cluster_snapshot
from kmsd.log.raft_log import RaftLog
from kmsd.raft import ConfState
from kmsd.storage.snapshots import SnapshotStore
from kmsd.transport.codec import conf_to_proto

SNAPSHOTTING = dataclasses.replace(FAST, snapshot_every=8, trailing_entries=2)


class GatedMachine(ListMachine):
    """Freezes like ListMachine; encoding then waits for `gate` (open unless closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.frozen_at: list[int] = []
        self.encoding = threading.Event()

    def freeze(self) -> Iterator[bytes]:
        self.frozen_at.append(self.applied_index)
        data = self.snapshot()

        def encode() -> Iterator[bytes]:
            self.encoding.set()
            if not self.gate.wait(timeout=30):
                raise AssertionError("the test never opened the gate")
            yield data

        return encode()


def gated(cluster: Cluster, node_id: int) -> GatedMachine:
    machine = cluster.machines[node_id]
    assert isinstance(machine, GatedMachine)
    return machine


async def wait_encoding(machine: GatedMachine) -> None:
    await until(machine.encoding.is_set, "the snapshot thread encoding")


async def restarted_commands(cluster: Cluster, node_id: int) -> list[bytes]:
    """Restarts a node from its disk; what its state machine holds once caught up."""
    await cluster.stop(node_id)
    node = await cluster.start(node_id)
    leader = await cluster.leader()
    await until(lambda: node.applied_index >= leader.applied_index, "the restarted node caught up")
    return cluster.machines[node_id].commands


def test_writes_commit_while_every_node_encodes_its_snapshot(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        machines = {i: gated(cluster, i) for i in cluster.nodes}
        for machine in machines.values():
            machine.gate.clear()
        for i in range(SNAPSHOTTING.snapshot_every + 4):
            await leader.propose(b"a-%d" % i)
        for machine in machines.values():
            await wait_encoding(machine)
        # Every node is stuck encoding a snapshot, and writes still commit everywhere.
        for i in range(3 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"b-%d" % i)
        last = leader.applied_index
        await until(
            lambda: all(n.applied_index == last for n in cluster.nodes.values()), "all applied"
        )
        assert all(n.snapshot_index == 0 for n in cluster.nodes.values())
        for machine in machines.values():
            machine.gate.set()
        await until(
            lambda: all(n.snapshot_index > 0 for n in cluster.nodes.values()), "snapshots recorded"
        )
        for i, node in cluster.nodes.items():
            # The first one, or (with more than snapshot_every writes since) a later one.
            assert node.snapshot_index in machines[i].frozen_at
        # The next writes take the next snapshots, as usual.
        for i in range(3 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"c-%d" % i)
        first = max(m.frozen_at[0] for m in machines.values())
        await until(
            lambda: all(n.snapshot_index > first for n in cluster.nodes.values()), "later snapshots"
        )
        expected = list(cluster.machines[leader.node_id].commands)
        follower = next(i for i in cluster.nodes if i != leader.node_id)
        assert await restarted_commands(cluster, follower) == expected

    run(scenario, tmp_path, settings=SNAPSHOTTING, machine=GatedMachine)


def test_a_leader_snapshot_installed_meanwhile_wins_over_the_own_one(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        behind = next(i for i in cluster.nodes if i != leader.node_id)
        follower: RaftLog = cluster.nodes[behind]
        own = gated(cluster, behind)
        own.gate.clear()
        for i in range(SNAPSHOTTING.snapshot_every):
            await leader.propose(b"a-%d" % i)
        await wait_encoding(own)
        frozen = own.frozen_at[0]
        cluster.network.isolate(behind)
        for i in range(4 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"b-%d" % i)
        await until(lambda: leader.snapshot_index > frozen + 8, "the leader's newer snapshot")
        cluster.network.heal()
        await until(lambda: follower.snapshot_index > frozen, "the leader's snapshot installed")
        installed = follower.snapshot_index
        own.gate.set()  # its own, older snapshot now completes: it must change nothing
        await until(
            lambda: follower.applied_index >= leader.applied_index, "the follower caught up"
        )
        assert follower.snapshot_index >= installed
        expected = list(cluster.machines[leader.node_id].commands)
        assert cluster.machines[behind].commands == expected
        await cluster.stop(behind)  # waits for the snapshot thread
        latest = SnapshotStore.open(tmp_path / f"n{behind}" / "snap").load_latest()
        assert latest is not None and latest.index >= installed > frozen
        node = await cluster.start(behind)
        await until(lambda: node.applied_index >= leader.applied_index, "the restart caught up")
        assert cluster.machines[behind].commands == expected

    run(scenario, tmp_path, settings=SNAPSHOTTING, machine=GatedMachine)


@pytest.mark.parametrize("state", [[], [b""], [b"a"], [b"x" * 100, b"", b"y" * 300]])
def test_a_cluster_snapshot_joined_from_chunks_is_what_protobuf_would_write(
    state: list[bytes],
) -> None:
    conf = ConfState(frozenset({1, 2, 3}), frozenset({4}), frozenset({7}))
    members = [Member(2, "p2", "c2"), Member(1, "p1", "c1")]
    expected = wal_pb2.ClusterSnapshot(
        state=b"".join(state),
        conf=conf_to_proto(conf),
        members=[
            wal_pb2.Member(id=m.id, peer_address=m.peer_address, client_address=m.client_address)
            for m in sorted(members, key=lambda m: m.id)
        ],
    ).SerializeToString()
    assert cluster_snapshot(state, conf, members) == expected


def test_a_snapshot_that_cannot_be_written_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written on the snapshot thread, a snapshot's I/O error is still fail-stop: the
    node stops and refuses writes rather than go on with a log it cannot compact."""

    def disk_full(self: RaftDisk, index: int, term: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        monkeypatch.setattr(RaftDisk, "write_snapshot", disk_full)
        with pytest.raises(UnavailableError, match="No space left"):
            for i in range(3 * SNAPSHOTTING.snapshot_every):
                await leader.propose(b"a-%d" % i)
        await until(lambda: leader.failure is not None, "the leader failing")
        assert isinstance(leader.failure, OSError)
        with pytest.raises(UnavailableError):
            await leader.propose(b"after")

    run(scenario, tmp_path, settings=SNAPSHOTTING)


class Refusing:
    """A `before_compaction` that raises until allowed, counting its calls."""

    def __init__(self) -> None:
        self.allowed = False
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.allowed:
            raise OSError(errno.EIO, "the audit log cannot be synced")


def test_no_own_snapshot_while_before_compaction_fails(tmp_path: Path) -> None:
    refusing = Refusing()

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        for i in range(3 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"a-%d" % i)
        await until(lambda: refusing.calls >= 3, "every node asking")
        assert all(n.snapshot_index == 0 for n in cluster.nodes.values())  # postponed
        assert all(n.failure is None for n in cluster.nodes.values())
        refusing.allowed = True
        for i in range(SNAPSHOTTING.snapshot_every):
            await leader.propose(b"b-%d" % i)
        await until(
            lambda: all(n.snapshot_index > 0 for n in cluster.nodes.values()), "the snapshots"
        )

    run(scenario, tmp_path, settings=SNAPSHOTTING, before_compaction=refusing)


def test_a_snapshot_from_the_leader_is_not_installed_while_before_compaction_fails(
    tmp_path: Path,
) -> None:
    """A lagging follower that cannot make its derived state durable stops rather than
    let the leader's snapshot replace its log."""
    refusing = Refusing()

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        behind = next(i for i in cluster.nodes if i != leader.node_id)
        follower = cluster.nodes[behind]
        await cluster.stop(behind)
        for i in range(4 * SNAPSHOTTING.snapshot_every):
            await leader.propose(b"a-%d" % i)
        await until(lambda: leader.snapshot_index > 8, "the leader's snapshot")
        cluster.before_compaction[behind] = refusing
        follower = await cluster.start(behind)
        await until(lambda: follower.failure is not None, "the follower stopping")
        assert isinstance(follower.failure, OSError) and refusing.calls >= 1
        assert "audit log cannot be synced" in str(follower.failure)
        assert follower.snapshot_index == 0 and follower.applied_index < leader.applied_index
        await leader.propose(b"after")  # the other two go on

    run(scenario, tmp_path, settings=SNAPSHOTTING)
