"""Three RaftLogs in one process over an in-memory network: replication, failover,
restart from disk, read barriers, forwarding."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import Cluster, run, until

from kmsd.errors import UnavailableError


def test_replicates_to_every_node_and_forwards_from_followers(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        first = await leader.propose(b"a")
        follower = next(n for n in cluster.nodes.values() if not n.is_leader())
        second = await follower.propose(b"b")
        assert second.index > first.index and second.result == 2
        await until(
            lambda: all(m.commands == [b"a", b"b"] for m in cluster.machines.values()),
            "replication",
        )
        index = await follower.read_barrier()
        assert index >= second.index

    run(scenario, tmp_path)


def test_leader_failover_and_restart_from_disk(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        for i in range(20):
            await leader.propose(b"x%d" % i)
        old = leader.node_id
        await cluster.stop(old)
        new = await cluster.leader()
        assert new.node_id != old
        await new.propose(b"after")
        restarted = await cluster.start(old)
        await until(lambda: cluster.machines[old].commands[-1:] == [b"after"], "catch-up")
        assert cluster.machines[old].commands == cluster.machines[new.node_id].commands
        assert len(cluster.machines[old].commands) == 21
        assert not restarted.is_leader() or restarted is new

    run(scenario, tmp_path)


def test_minority_refuses_writes_and_reads(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        cluster.network.isolate(leader.node_id)
        await until(lambda: not leader.is_leader(), "the isolated leader to step down")
        with pytest.raises(UnavailableError):
            await leader.propose(b"lost")
        majority = await cluster.leader()
        assert majority.node_id != leader.node_id
        await majority.propose(b"b")
        cluster.network.heal()
        await until(lambda: cluster.machines[leader.node_id].commands == [b"a", b"b"], "healing")

    run(scenario, tmp_path)


def test_a_restarted_node_never_gets_its_previous_lifes_results(tmp_path: Path) -> None:
    """Proposals are matched to their entries by (node, sequence number). A node that
    restarts while entries it proposed before are still to be applied must not
    answer a new proposal with one of those (it once did: the sequence restarted at 1)."""

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        follower_id = next(i for i in cluster.nodes if i != leader.node_id)
        follower = cluster.nodes[follower_id]
        for i in range(30):
            await follower.propose(b"old-%d" % i)
        await cluster.stop(follower_id)
        restarted = await cluster.start(follower_id)
        for i in range(30):
            applied = await restarted.propose(b"new-%d" % i)
            machine = cluster.machines[follower_id]
            assert machine.commands[applied.result - 1] == b"new-%d" % i  # type: ignore[operator]

    run(scenario, tmp_path)
