"""An in-process cluster of RaftLogs over an InMemoryNetwork, for the tests here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

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

    def freeze(self) -> Iterator[bytes]:
        return iter([self.snapshot()])

    def restore(self, data: bytes) -> None:
        self.commands = data.split(b"\x00") if data else []


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Cluster:
    def __init__(
        self,
        root: Path,
        size: int = 3,
        settings: RaftSettings = FAST,
        network: InMemoryNetwork | None = None,
        machine: Callable[[], ListMachine] = ListMachine,
    ) -> None:
        self.root = root
        self.new_machine = machine
        self.network = network or InMemoryNetwork()
        self.founders = [Member(i, f"peer-{i}", f"client-{i}") for i in range(1, size + 1)]
        self.settings = settings
        self.nodes: dict[int, RaftLog] = {}
        self.machines: dict[int, ListMachine] = {}
        # What a node runs before a snapshot replaces its entries (none by default).
        self.before_compaction: dict[int, Callable[[], None]] = {}

    async def start(self, node_id: int) -> RaftLog:
        machine = self.new_machine()
        node = RaftLog(
            node_id,
            self.root / f"n{node_id}",
            machine,
            self.network.transport(node_id),
            founders=self.founders,
            settings=self.settings,
            before_compaction=self.before_compaction.get(node_id),
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
        await until(lambda: any(n.is_leader() for n in self.nodes.values()), "a leader")
        return next(n for n in self.nodes.values() if n.is_leader())

    async def close(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)


def run(
    scenario: Callable[[Cluster], Awaitable[None]],
    root: Path,
    size: int = 3,
    settings: RaftSettings = FAST,
    network: InMemoryNetwork | None = None,
    machine: Callable[[], ListMachine] = ListMachine,
    before_compaction: Callable[[], None] | None = None,
) -> None:
    async def main() -> None:
        cluster = Cluster(root, size, settings, network, machine)
        if before_compaction is not None:
            cluster.before_compaction = dict.fromkeys(range(1, size + 1), before_compaction)
        try:
            await cluster.start_all()
            await scenario(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())
