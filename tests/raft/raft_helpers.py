"""Deterministic helpers for the table and paper tests of kmsd.raft.

`Node` is a RawNode with a synchronous, well-behaved driver (persist, then send,
then apply, then advance); `Net` connects a few Nodes with a FIFO network that can
isolate nodes and drop messages by predicate (etcd's raft_test.go `network`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RawNode,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)


def storage_with(
    voters: Iterable[int],
    terms: Iterable[int] = (),
    *,
    hard_state: HardState | None = None,
) -> MemoryStorage:
    """A founding member's storage whose log continues with one entry per term in
    `terms` (after the bootstrap entries, which are at term 1)."""
    storage = MemoryStorage.bootstrapped(voters)
    first = storage.last_index() + 1
    entries = [
        Entry(first + i, term, EntryType.NORMAL, f"e{first + i}t{term}".encode())
        for i, term in enumerate(terms)
    ]
    storage.append(entries)
    if hard_state is not None:
        storage.set_hard_state(hard_state)
    return storage


def snapshot(index: int, term: int, voters: Iterable[int], data: bytes = b"s") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, ConfState(frozenset(voters))), data)


def msg(kind: MessageType, src: int, dst: int, term: int, **fields: object) -> Message:
    return dataclasses.replace(Message(kind, src, dst, term), **fields)  # type: ignore[arg-type]


class Node:
    """A RawNode driven synchronously: every Ready is persisted, sent and applied."""

    def __init__(
        self,
        node_id: int,
        voters: Iterable[int] | None = None,
        *,
        storage: MemoryStorage | None = None,
        seed: int = 0,
        **config: object,
    ) -> None:
        self.id = node_id
        if storage is None:
            storage = MemoryStorage.bootstrapped(voters) if voters else MemoryStorage()
        self.storage = storage
        self.config = Config(id=node_id, **config)  # type: ignore[arg-type]
        self.seed = seed
        self.applied: list[Entry] = []
        self.read_states: list[ReadState] = []
        self.readies: list[Ready] = []
        self.conf = storage.snapshot().meta.conf
        self.raw = RawNode(self.config, storage, random.Random(seed))

    def restart(self) -> None:
        """Crash and restart from what was persisted."""
        self.raw = RawNode(self.config, self.storage, random.Random(self.seed + 1))
        self.conf = self.storage.snapshot().meta.conf

    def drain(self) -> list[Message]:
        """Processes every Ready; returns the messages to send."""
        out: list[Message] = []
        while self.raw.has_ready():
            out.extend(self.process(self.raw.ready()))
        return out

    def process(self, ready: Ready) -> list[Message]:
        self.readies.append(ready)
        if ready.snapshot is not None:
            self.storage.apply_snapshot(ready.snapshot)
            self.conf = ready.snapshot.meta.conf
        self.storage.append(ready.entries)
        if ready.hard_state is not None:
            self.storage.set_hard_state(ready.hard_state)
        for entry in ready.committed_entries:
            self.applied.append(entry)
            if entry.type == EntryType.CONF_CHANGE:
                self.conf = self.raw.apply_conf_change(ConfChange.decode(entry.data))
        self.read_states.extend(ready.read_states)
        self.raw.advance(ready)
        return list(ready.messages)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.raw.tick()

    @property
    def role(self) -> Role:
        return self.raw.soft_state().role

    @property
    def term(self) -> int:
        return self.raw.term

    @property
    def leader(self) -> int:
        return self.raw.soft_state().leader

    def data(self) -> list[bytes]:
        """The NORMAL payloads applied so far."""
        return [e.data for e in self.applied if e.type == EntryType.NORMAL]

    def commit(self) -> int:
        return self.raw.status().commit


class Net:
    """A few Nodes on a FIFO network with isolation and drop predicates."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.isolated: set[int] = set()
        self.drop: Callable[[Message], bool] = lambda m: False
        self.delivered: list[Message] = []

    @classmethod
    def of(cls, size: int, **config: object) -> Net:
        voters = range(1, size + 1)
        return cls(Node(i, voters, seed=i, **config) for i in voters)  # type: ignore[arg-type]

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def add(self, node: Node) -> None:
        self.nodes[node.id] = node

    def blocked(self, m: Message) -> bool:
        return (
            m.src in self.isolated
            or m.dst in self.isolated
            or m.dst not in self.nodes
            or self.drop(m)
        )

    def stabilize(self, max_rounds: int = 1000, queue: list[Message] | None = None) -> None:
        """Drains every node and delivers every message until nothing moves."""
        queue = list(queue or [])
        for _ in range(max_rounds):
            for node in self.nodes.values():
                queue.extend(node.drain())
            if not queue:
                return
            batch, queue = queue, []
            for m in batch:
                if not self.blocked(m):
                    self.delivered.append(m)
                    self.nodes[m.dst].raw.step(m)
        raise AssertionError("the network did not stabilize")

    def send(self, messages: list[Message]) -> None:
        """Delivers messages a test took out of a Ready by hand, then stabilizes."""
        self.stabilize(queue=messages)

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for node in self.nodes.values():
                node.tick()
            self.stabilize()

    def elect(self, node_id: int) -> Node:
        node = self.nodes[node_id]
        node.drain()  # apply the bootstrap membership before campaigning
        node.raw.campaign()
        self.stabilize()
        assert node.role == Role.LEADER, f"node {node_id} did not win: {node.raw.status()}"
        return node

    def leaders(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.role == Role.LEADER]

    def count(self, kind: MessageType) -> int:
        return sum(1 for m in self.delivered if m.type == kind)


def add_learner(net: Net, leader: Node, node_id: int) -> Node:
    """Adds `node_id` as a learner through `leader` and connects a fresh node."""
    net.add(Node(node_id, seed=node_id))
    leader.raw.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, node_id))
    net.stabilize()
    return net[node_id]
