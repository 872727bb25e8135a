"""The Raft driver's own rules (kmsd/log/raft_log.py), on in-process clusters: what is
made durable before which message leaves, what costs no write, writes and reads that
wait out an election, leadership hand-over on stop, freshness probes on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cluster_helpers import FAST, Cluster, run, until

from kmsd.log.raft_disk import RaftDisk
from kmsd.raft import Entry, HardState, Message, MessageType, Snapshot
from kmsd.transport.inmem import InMemoryNetwork, InMemoryTransport


@dataclass(frozen=True)
class Event:
    """One thing a node did: `persisted` (its disk returned from a write) or `sent`."""

    node: int
    kind: str
    message: Message | None = None
    entries: tuple[int, ...] = ()
    hard_state: HardState | None = None
    sync: bool = False


class Recorder:
    """The order of every node's writes and sends, in one list."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[Event] = []
        original = RaftDisk.persist
        recorder = self

        def persist(
            disk: RaftDisk,
            snapshot: Snapshot | None,
            entries: Sequence[Entry],
            hard_state: HardState | None,
            sync: bool,
        ) -> None:
            original(disk, snapshot, entries, hard_state, sync)
            node = int(disk._dir.name.removeprefix("n"))
            recorder.events.append(
                Event(node, "persisted", None, tuple(e.index for e in entries), hard_state, sync)
            )

        monkeypatch.setattr(RaftDisk, "persist", persist)

    def network(self) -> InMemoryNetwork:
        recorder = self

        class Transport(InMemoryTransport):
            def send(self, messages: Sequence[Message]) -> None:
                for message in messages:
                    recorder.events.append(Event(message.src, "sent", message))
                super().send(messages)

        class Network(InMemoryNetwork):
            def transport(self, node_id: int) -> InMemoryTransport:
                return Transport(self, node_id)

        return Network()

    def sent(self, kind: MessageType) -> list[Message]:
        return [e.message for e in self.events if e.message is not None and e.message.type == kind]


def _durable_index(events: list[Event], node: int) -> int:
    return max((max(e.entries) for e in events if e.node == node and e.entries), default=0)


def test_leader_sends_appends_before_its_fsync_and_followers_ack_only_after_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch)

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        for i in range(20):
            await leader.propose(b"x%d" % i)
        events = recorder.events
        early = 0
        for position, event in enumerate(events):
            message = event.message
            if message is None:
                continue
            before = events[:position]
            if message.type == MessageType.APPEND and message.entries:
                last = message.entries[-1].index
                # Not yet on the sender's disk when it left: sent before the fsync.
                early += _durable_index(before, message.src) < last
            if message.type == MessageType.APPEND_RESP and not message.reject:
                # An ack never leaves before the entries it acknowledges are durable.
                assert _durable_index(before, message.src) >= message.index, message
            if message.type == MessageType.VOTE_RESP and not message.reject:
                votes = [e.hard_state for e in before if e.node == message.src and e.hard_state]
                assert votes and votes[-1].vote == message.dst and votes[-1].term >= message.term
        assert early >= 20  # the leader's own writes overlap its followers'

    run(scenario, tmp_path, network=recorder.network())


def test_a_moved_commit_index_costs_no_write_of_its_own_and_is_saved_on_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch)

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        for i in range(10):
            await leader.propose(b"x%d" % i)
        last = (await leader.propose(b"last")).index
        for node in list(cluster.nodes):
            await until(lambda n=node: cluster.nodes[n].applied_index >= last, "apply")
        followers = [n for n in cluster.nodes if n != leader.node_id]
        for node in [*followers, leader.node_id]:  # no leadership hand-over to follow
            await cluster.stop(node)
        for node in (1, 2, 3):
            writes = [e for e in recorder.events if e.node == node and e.kind == "persisted"]
            previous: HardState | None = None
            for write in writes[:-1]:
                state = write.hard_state
                assert write.sync
                if not write.entries and state is not None and previous is not None:
                    assert (state.term, state.vote) != (previous.term, previous.vote), write
                previous = state or previous
            # The last commit index moved without a write; stopping wrote it, unsynced.
            final = writes[-1]
            assert not final.sync and not final.entries
            assert final.hard_state is not None and final.hard_state.commit >= last
            storage, _ = RaftDisk(tmp_path / f"n{node}").open()
            assert storage.initial_state()[0].commit >= last

    run(scenario, tmp_path, network=recorder.network())


def test_a_write_on_a_follower_waits_out_the_election_when_the_leader_vanishes(
    tmp_path: Path,
) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        assert follower.leader_id == leader.node_id
        cluster.network.isolate(leader.node_id)  # a crash, as the others see it
        # Forwarding to the old leader fails at once; the write waits for the next
        # leader (within its timeout) instead of failing.
        applied = await follower.propose(b"b")
        assert follower.leader_id not in (0, leader.node_id)
        assert applied.index > 1

    run(scenario, tmp_path)


def test_a_write_on_a_node_without_quorum_fails_after_its_timeout(tmp_path: Path) -> None:
    settings = replace(FAST, request_timeout_s=0.3)

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        cluster.network.isolate(leader.node_id)
        await until(lambda: not leader.is_leader(), "the isolated leader to step down")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Exception, match="cannot reach a quorum|not committed in time"):
            await leader.propose(b"lost")
        assert loop.time() - started < 2.0

    run(scenario, tmp_path, settings=settings)


def test_a_leader_that_stops_hands_over_its_leadership_first(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        for i in range(5):
            await leader.propose(b"x%d" % i)
        old = leader.node_id
        await cluster.stop(old)
        # No election timeout to wait out: a successor already leads.
        successors = [n for n in cluster.nodes.values() if n.is_leader()]
        assert len(successors) == 1
        applied = await successors[0].propose(b"after")
        assert applied.index > 5

    run(scenario, tmp_path)


def test_freshness_is_probed_only_while_bounded_staleness_reads_come(tmp_path: Path) -> None:
    recorder_events: list[Message] = []

    class Network(InMemoryNetwork):
        def deliver(self, message: Message) -> None:
            recorder_events.append(message)
            super().deliver(message)

    def count(kind: MessageType) -> int:
        return sum(1 for m in recorder_events if m.type == kind)

    settings = replace(FAST, probe_idle_s=0.1)

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        heartbeats = count(MessageType.HEARTBEAT)
        await until(lambda: count(MessageType.HEARTBEAT) >= heartbeats + 40, "heartbeats")
        assert count(MessageType.READ_INDEX) == 0  # idle: nobody asked, nothing probed
        # Asked, the follower probes until its state is provably fresh.
        assert not follower.fresh_within(0.2)
        await until(lambda: follower.fresh_within(0.2), "a fresh follower")
        probes = count(MessageType.READ_INDEX)
        assert probes >= 1
        # Not asked any more: probing stops (one may be under way).
        heartbeats = count(MessageType.HEARTBEAT)
        await until(lambda: count(MessageType.HEARTBEAT) >= heartbeats + 60, "heartbeats")
        settled = count(MessageType.READ_INDEX)
        heartbeats = count(MessageType.HEARTBEAT)
        await until(lambda: count(MessageType.HEARTBEAT) >= heartbeats + 40, "heartbeats")
        assert count(MessageType.READ_INDEX) == settled

    run(scenario, tmp_path, settings=settings, network=Network())


def test_a_linearizable_read_also_proves_freshness(tmp_path: Path) -> None:
    settings = replace(FAST, probe_idle_s=0.0)  # no probes: only the read can prove it

    async def scenario(cluster: Cluster) -> None:
        leader = await cluster.leader()
        await leader.propose(b"a")
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        assert not follower.fresh_within(5.0)
        await follower.read_barrier()
        assert follower.fresh_within(5.0)

    run(scenario, tmp_path, settings=settings)
