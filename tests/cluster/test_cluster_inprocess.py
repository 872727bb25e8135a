"""Three RaftLogs in one process over an in-memory network: replication, failover,
restart from disk, read barriers, forwarding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kmsd.errors import UnavailableError
from kmsd.log.raft_disk import Member
from kmsd.log.raft_log import RaftLog, RaftSettings
from kmsd.transport.inmem import InMemoryNetwork

FAST = RaftSettings(tick_seconds=0.01, election_ticks=10, request_timeout_s=2.0)


class ListMachine:
    """A state machine that records its commands (deterministic, snapshot-able)."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []
        self._applied = 0

    @property
    def applied_index(self) -> int:
        return self._applied

    def apply(self, index: int, command: bytes) -> object:
        self.commands.append(command)
        self._applied = index
        return len(self.commands)

    def snapshot(self) -> bytes:
        return b"\x00".join(self.commands)

    def restore(self, data: bytes) -> None:
        self.commands = data.split(b"\x00") if data else []


async def _until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Cluster:
    def __init__(self, root: Path, size: int = 3, settings: RaftSettings = FAST) -> None:
        self.root = root
        self.network = InMemoryNetwork()
        self.founders = [Member(i, f"peer-{i}", f"client-{i}") for i in range(1, size + 1)]
        self.settings = settings
        self.nodes: dict[int, RaftLog] = {}
        self.machines: dict[int, ListMachine] = {}

    async def start(self, node_id: int) -> RaftLog:
        machine = ListMachine()
        node = RaftLog(
            node_id,
            self.root / f"n{node_id}",
            machine,
            self.network.transport(node_id),
            founders=self.founders,
            settings=self.settings,
        )
        await node.start()
        self.nodes[node_id], self.machines[node_id] = node, machine
        return node

    async def start_all(self) -> None:
        for member in self.founders:
            await self.start(member.id)

    async def stop(self, node_id: int) -> None:
        await self.nodes.pop(node_id).stop()

    async def leader(self) -> RaftLog:
        await _until(lambda: any(n.is_leader() for n in self.nodes.values()), "a leader")
        return next(n for n in self.nodes.values() if n.is_leader())

    async def close(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)


def run(scenario: Callable[[Cluster], Awaitable[None]], root: Path, size: int = 3) -> None:
    async def main() -> None:
        cluster = Cluster(root, size)
        try:
            await cluster.start_all()
            await scenario(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())


def test_replicates_to_every_node_and_forwards_from_followers(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        first = await leader.propose(b"a")
        follower = next(n for n in cluster.nodes.values() if not n.is_leader())
        second = await follower.propose(b"b")
        assert second.index > first.index and second.result == 2
        await _until(
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
        await _until(lambda: cluster.machines[old].commands[-1:] == [b"after"], "catch-up")
        assert cluster.machines[old].commands == cluster.machines[new.node_id].commands
        assert len(cluster.machines[old].commands) == 21
        assert not restarted.is_leader() or restarted is new

    run(scenario, tmp_path)


def test_minority_refuses_writes_and_reads(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        cluster.network.isolate(leader.node_id)
        await _until(lambda: not leader.is_leader(), "the isolated leader to step down")
        with pytest.raises(UnavailableError):
            await leader.propose(b"lost")
        majority = await cluster.leader()
        assert majority.node_id != leader.node_id
        await majority.propose(b"b")
        cluster.network.heal()
        await _until(lambda: cluster.machines[leader.node_id].commands == [b"a", b"b"], "healing")

    run(scenario, tmp_path)
