"""A seeded simulated cluster for kmsd.raft: network, drivers, faults and invariant checks.

Each SimNode runs a RawNode over its own MemoryStorage, which holds only what was
"persisted". The driver is simulated exactly as kmsd/node.py must behave:
ready() -> (fsync in flight: other events may happen) -> persist -> send ->
apply -> advance(); a leader's early_send_ok batch may be sent before persisting.
A crash drops everything unpersisted (the outstanding Ready, hard-state writes not
yet fsynced, the in-memory node) and every in-flight message to or from the node.

The network reorders (random delivery order), delays (messages wait while other
events happen), drops, duplicates, partitions (groups) and cuts single links.

`raft_checker.Checker` verifies the safety invariants of reference/replication.md
§3.4 after every event (incrementally, on what the event changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from raft_checker import Checker, InvariantViolation, StateMachine

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    ReadIndexDropped,
    Ready,
    Role,
)


@dataclass
class SimNode:
    """One simulated server: durable storage plus (while up) a RawNode and its driver."""

    id: int
    storage: MemoryStorage
    synced: HardState = field(default_factory=HardState)
    raw: RawNode | None = None
    outstanding: Ready | None = None
    sent_early: bool = False
    sm: StateMachine = field(default_factory=StateMachine)
    conf: ConfState = field(default_factory=ConfState)
    removed: bool = False
    leaving: bool = False


@dataclass
class Weights:
    """Relative frequencies of random events (see `Weights.for_seed`)."""

    deliver: float = 30
    drive: float = 24
    tick_all: float = 7
    tick_one: float = 2
    drop: float = 2
    duplicate: float = 1.5
    propose: float = 6
    read: float = 2
    partition: float = 0.4
    cut_link: float = 0.3
    heal: float = 0.8
    crash: float = 0.3
    restart: float = 1.0
    conf_change: float = 0.4
    snapshot: float = 0.8
    transfer: float = 0.2
    pause: float = 0.2
    resume: float = 0.6
    crash_leader: float = 0.1

    @classmethod
    def for_seed(cls, rng: random.Random) -> Weights:
        """A fault profile: calm, normal or stormy, with short or long partitions."""
        faults = rng.choice([0.3, 1.0, 2.5])
        # Ticks per message hop: a fast network elects quickly; a slow one (hops
        # close to the election timeout) splits votes and exercises retries.
        clock = rng.choice([1.5, 1.5, 3.0, 7.0])
        return cls(
            tick_all=clock,
            tick_one=clock / 4,
            drop=2 * faults,
            duplicate=1.5 * faults,
            partition=0.4 * faults,
            cut_link=0.3 * faults,
            heal=rng.choice([0.15, 0.8]),
            crash=0.3 * faults,
            pause=0.2 * faults,
            resume=rng.choice([0.2, 0.8]),
            crash_leader=rng.choice([0.0, 0.3 * faults]),
            conf_change=rng.choice([0.4, 1.5]),
            snapshot=rng.choice([0.3, 1.5]),
            transfer=rng.choice([0.1, 0.5]),
        )


class Cluster:
    """N nodes on a faulty network, driven by one seeded Random."""

    def __init__(
        self,
        size: int,
        seed: int,
        *,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        pre_vote: bool = True,
        check_quorum: bool = True,
        max_inflight: int = 8,
        max_size: int = 64,
        extra_nodes: int = 3,
        weights: Weights | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.base_size = size
        self.max_id = size + extra_nodes
        self.next_id = size + 1
        self.config = Config(
            id=1,
            election_tick=election_tick,
            heartbeat_tick=heartbeat_tick,
            pre_vote=pre_vote,
            check_quorum=check_quorum,
            max_inflight_msgs=max_inflight,
            max_size_per_msg=max_size,
        )
        self.removed_ids: set[int] = set()
        self.nodes: dict[int, SimNode] = {}
        self.net: list[Message] = []
        self.group: dict[int, int] = {}
        self.cut: set[tuple[int, int]] = set()
        self.paused: set[int] = set()
        # Clock skew: some nodes see fewer ticks (a slow or stalled machine).
        self.tick_rate: dict[int, float] = {}
        self.skew = self.rng.random() < 0.3
        self.checker = Checker()
        self.trace: deque[str] = deque(maxlen=60)
        self.proposals = 0
        self.stats: dict[str, int] = {}
        self.weights = weights or Weights.for_seed(self.rng)
        founders = range(1, size + 1)
        for node_id in founders:
            self._start(SimNode(node_id, MemoryStorage.bootstrapped(founders)))
        self._actions: list[tuple[float, Callable[[], object]]] = [
            (self.weights.deliver, self.deliver_random),
            (self.weights.drive, self.drive_random),
            (self.weights.tick_all, self.tick_all),
            (self.weights.tick_one, lambda: self.tick(self._any_up())),
            (self.weights.drop, self.drop_random),
            (self.weights.duplicate, lambda: self.deliver_random(duplicate=True)),
            (self.weights.propose, self.propose_random),
            (self.weights.read, self.read_random),
            (self.weights.partition, self.partition_random),
            (self.weights.cut_link, self.cut_random_link),
            (self.weights.heal, self.heal),
            (self.weights.crash, self.crash_random),
            (self.weights.restart, self.restart_random),
            (self.weights.conf_change, self.conf_change),
            (self.weights.snapshot, self.snapshot_random),
            (self.weights.transfer, self.transfer_random),
            (self.weights.pause, self.pause_random),
            (self.weights.resume, self.resume_random),
            (self.weights.crash_leader, self.crash_leader),
        ]
        self._cum: list[float] = []
        total = 0.0
        for weight, _ in self._actions:
            total += weight
            self._cum.append(total)

    # -- lifecycle -------------------------------------------------------------------

    def _start(self, node: SimNode) -> None:
        self.nodes[node.id] = node
        config = dataclasses.replace(self.config, id=node.id)
        node.raw = RawNode(config, node.storage, random.Random(self.rng.getrandbits(64)))
        node.outstanding = None
        snapshot = node.storage.snapshot()
        node.sm = StateMachine.restore(snapshot.data)
        node.conf = snapshot.meta.conf
        node.synced = node.storage.hard_state
        self.checker.on_restart(node)
        self.checker.on_synced(node)

    def up(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.raw is not None]

    def active(self) -> list[SimNode]:
        """Nodes that are up and not paused."""
        return [n for n in self.up() if n.id not in self.paused]

    def _any_up(self) -> SimNode | None:
        live = self.active()
        return self.rng.choice(live) if live else None

    def crash(self, node: SimNode) -> None:
        self.trace.append(f"crash {node.id}")
        self.count("crash")
        self.paused.discard(node.id)
        node.raw = None
        node.outstanding = None
        # Hard-state writes that were never fsynced are lost (only commit can differ).
        node.storage.set_hard_state(node.synced)
        kept = []
        for m in self.net:
            if node.id in (m.src, m.dst):
                self._lost(m)  # a snapshot stream to a crashed node fails
            else:
                kept.append(m)
        self.net = kept

    def restart(self, node: SimNode) -> None:
        self.trace.append(f"restart {node.id}")
        self._start(node)

    def _shutdown(self, node: SimNode) -> None:
        self.crash(node)
        node.removed = True

    # -- the driver ------------------------------------------------------------------

    def drive_random(self) -> None:
        """One driver step on a busy node: finish its fsync (sometimes it lingers,
        keeping the Ready in flight while other events happen) or take a new Ready."""
        busy = [n for n in self.active() if n.outstanding is not None or n.raw.has_ready()]  # type: ignore[union-attr]
        if not busy:
            return
        node = self.rng.choice(busy)
        if node.outstanding is None:
            self.take_ready(node)
        elif self.rng.random() < 0.8:
            self.persist(node)

    def take_ready(self, node: SimNode | None) -> bool:
        if node is None or node.raw is None or node.outstanding is not None:
            return False
        if not node.raw.has_ready():
            return False
        ready = node.raw.ready()
        node.outstanding = ready
        node.sent_early = False
        if ready.early_send_ok and ready.messages and self.rng.random() < 0.5:
            self._send_all(node, ready.messages)
            node.sent_early = True
        return True

    def persist(self, node: SimNode | None) -> bool:
        if node is None or node.raw is None or node.outstanding is None:
            return False
        ready = node.outstanding
        self._persist(node, ready)
        if not node.sent_early:
            self._send_all(node, ready.messages)
        self._apply(node, ready)
        node.outstanding = None
        node.raw.advance(ready)
        self.checker.observe(node)
        if node.leaving:
            self._shutdown(node)
        return True

    def _persist(self, node: SimNode, ready: Ready) -> None:
        storage, checker = node.storage, self.checker
        old = storage.hard_state
        if ready.snapshot is not None:
            storage.apply_snapshot(ready.snapshot)
        if ready.entries:
            checker.before_append(node, ready.entries)
            storage.append(ready.entries)
            checker.after_append(node, ready.entries)
        if ready.hard_state is not None:
            checker.on_hard_state(node, old, ready.hard_state)
            storage.set_hard_state(ready.hard_state)
        if ready.must_sync:
            node.synced = storage.hard_state
            checker.on_synced(node)
        checker.on_commit_range(
            node, max(old.commit, storage.first_index() - 1), storage.hard_state.commit
        )

    def _send_all(self, node: SimNode, messages: list[Message]) -> None:
        for m in messages:
            self.checker.on_send(node, m)
            self.net.append(m)

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _apply(self, node: SimNode, ready: Ready) -> None:
        assert node.raw is not None
        if ready.snapshot is not None:
            self.count("snapshot_installed")
            node.sm = StateMachine.restore(ready.snapshot.data)
            node.conf = ready.snapshot.meta.conf
            self.checker.on_membership(node, ready.snapshot.meta.index, node.conf)
            if node.sm.index != ready.snapshot.meta.index:
                self.checker.fail("snapshot data does not match its index")
            self.checker.on_applied(node)
        for entry in ready.committed_entries:
            self.checker.record_committed(node, entry)
            node.sm.apply(entry)
            if entry.type == EntryType.CONF_CHANGE:
                change = ConfChange.decode(entry.data)
                was_leader = node.raw.soft_state().role == Role.LEADER
                node.conf = node.raw.apply_conf_change(change)
                # A snapshot stepped in while this Ready was out already moved the
                # core's membership ahead (an older change applied on it is skipped).
                pending = node.raw._raft.log.unstable.snapshot
                if pending is None or pending.meta.index <= entry.index:
                    self.checker.on_membership(node, entry.index, node.conf)
                self.count(f"conf_applied_{change.type.name}")
                if was_leader and node.raw.soft_state().role != Role.LEADER:
                    self.count("leader_stepped_down_on_removal")
                if change.type == ConfChangeType.REMOVE_NODE:
                    self.removed_ids.add(change.node_id)
                    node.leaving = node.leaving or change.node_id == node.id
            self.checker.on_applied(node)
        for state in ready.read_states:
            self.checker.on_read_state(node, state.index, state.context)

    # -- the network -----------------------------------------------------------------

    def connected(self, src: int, dst: int) -> bool:
        return self.group.get(src, 0) == self.group.get(dst, 0) and (src, dst) not in self.cut

    def _pop_random(self) -> Message | None:
        if not self.net:
            return None
        i = self.rng.randrange(len(self.net))
        self.net[i], self.net[-1] = self.net[-1], self.net[i]
        return self.net.pop()

    def deliver_random(self, duplicate: bool = False) -> bool:
        m = self._pop_random()
        if m is None:
            return False
        if m.dst in self.paused:
            self.net.insert(0, m)  # a paused process reads nothing: it waits
            return False
        if duplicate:
            self.net.append(m)
        self.deliver(m)
        return True

    def deliver(self, m: Message) -> None:
        dst = self.nodes.get(m.dst)
        if dst is None or dst.raw is None or not self.connected(m.src, m.dst):
            self._lost(m)
            return
        dst.raw.step(m)
        self.checker.observe(dst)
        if m.type == MessageType.TIMEOUT_NOW:
            self.count("timeout_now_delivered")
        if m.type == MessageType.SNAPSHOT:
            self._report_snapshot(m, ok=True)

    def _lost(self, m: Message) -> None:
        if m.type == MessageType.SNAPSHOT:
            self._report_snapshot(m, ok=False)

    def _report_snapshot(self, m: Message, ok: bool) -> None:
        src = self.nodes.get(m.src)
        if src is not None and src.raw is not None:
            src.raw.report_snapshot(m.dst, ok)

    def drop_random(self) -> bool:
        m = self._pop_random()
        if m is not None:
            self._lost(m)
        return m is not None

    def partition_random(self) -> None:
        groups = 2 if len(self.nodes) < 5 or self.rng.random() < 0.6 else 3
        self.group = {n: self.rng.randrange(groups) for n in self.nodes}
        self.trace.append(f"partition {self.group}")

    def cut_random_link(self) -> None:
        ids = sorted(self.nodes)
        if len(ids) >= 2:
            a, b = self.rng.sample(ids, 2)
            self.cut.add((a, b))
            self.trace.append(f"cut {a}->{b}")

    def heal(self) -> None:
        self.group = {}
        self.cut = set()
        self.trace.append("heal")

    # -- clients and operators -------------------------------------------------------

    def tick(self, node: SimNode | None) -> None:
        if node is not None and node.raw is not None and node.id not in self.paused:
            node.raw.tick()
            self.checker.observe(node)

    def tick_all(self) -> None:
        for node in self.up():
            rate = self.tick_rate.get(node.id, 1.0)
            if rate >= 1.0 or self.rng.random() < rate:
                self.tick(node)

    def leader(self) -> SimNode | None:
        """The active (up, not paused) leader of the highest term, if any."""
        best: SimNode | None = None
        for node in self.active():
            assert node.raw is not None
            is_leader = node.raw.soft_state().role == Role.LEADER
            if is_leader and (best is None or node.raw.term > best.raw.term):  # type: ignore[union-attr]
                best = node
        return best

    def propose(self, node: SimNode, data: bytes) -> int | None:
        assert node.raw is not None
        try:
            index = node.raw.propose(data)
        except ProposalDropped:
            return None
        self.proposals += 1
        return index

    def propose_random(self) -> None:
        # Most clients reach the leader (kmsd forwards writes); some hit whoever.
        node = self.leader() if self.rng.random() < 0.7 else None
        if node is not None and node.id in self.paused:
            node = None
        node = node or self._any_up()
        if node is not None:
            self.propose(node, f"v{self.rng.getrandbits(32)}".encode())

    def read_random(self) -> None:
        node = self._any_up()
        if node is None or node.raw is None:
            return
        context = f"r{self.rng.getrandbits(48)}".encode()
        self.checker.on_read_issued(context)
        with contextlib.suppress(ReadIndexDropped):
            node.raw.read_index(context)

    def pause_random(self) -> None:
        node = self._any_up()
        if node is not None:
            self.paused.add(node.id)
            self.trace.append(f"pause {node.id}")
        if self.skew:
            # Stall a random node's clock for a while (GC pause, overloaded VM).
            for node_id in self.nodes:
                self.tick_rate[node_id] = self.rng.choice([1.0, 1.0, 0.5, 0.2])

    def resume_random(self) -> None:
        if self.paused:
            node_id = self.rng.choice(sorted(self.paused))
            self.paused.discard(node_id)
            self.trace.append(f"resume {node_id}")

    def crash_leader(self) -> None:
        leader = self.leader()
        if leader is not None:
            self.crash(leader)

    def crash_random(self) -> None:
        node = self._any_up()
        if node is not None:
            self.crash(node)

    def restart_random(self) -> None:
        down = [n for n in self.nodes.values() if n.raw is None and not n.removed]
        if down:
            self.restart(self.rng.choice(down))

    def snapshot_random(self) -> None:
        node = self._any_up()
        if node is None:
            return
        storage = node.storage
        index = node.sm.index
        if index <= storage.snapshot().meta.index or index > storage.last_index():
            return
        storage.create_snapshot(index, node.conf, node.sm.snapshot())
        keep = self.rng.randrange(0, 8)
        compact_to = index - keep
        if compact_to >= storage.first_index():
            storage.compact(compact_to)
        self.trace.append(f"snapshot {node.id}@{index} compact {compact_to}")

    def conf_change(self) -> None:
        leader = self.leader()
        if leader is None or leader.raw is None:
            return
        if self.removed_ids:
            # Ids are never reused: a re-add must be refused, whatever the leader went
            # through (restarts from snapshots, installed snapshots). Draws no rng.
            again = ConfChange(ConfChangeType.ADD_LEARNER, min(self.removed_ids), b"addr")
            try:
                leader.raw.propose_conf_change(again)
            except (ProposalDropped, ValueError):
                self.count("re_add_refused")
            else:
                self.checker.fail(f"leader {leader.id} proposed a re-add: {again}")
        conf = leader.conf
        new_node: int | None = None
        if conf.learners:
            change = ConfChange(ConfChangeType.ADD_VOTER, self.rng.choice(sorted(conf.learners)))
        elif len(conf.voters) <= self.base_size:
            if self.next_id > self.max_id:
                return
            new_node = self.next_id
            change = ConfChange(ConfChangeType.ADD_LEARNER, new_node, b"addr")
        else:
            change = ConfChange(ConfChangeType.REMOVE_NODE, self.rng.choice(sorted(conf.voters)))
        try:
            leader.raw.propose_conf_change(change)
        except (ProposalDropped, ValueError):
            return
        self.trace.append(f"conf {change.type.name} {change.node_id} via {leader.id}")
        self.count(f"conf_proposed_{change.type.name}")
        if new_node is not None:
            self.next_id += 1
            self._start(SimNode(new_node, MemoryStorage()))

    def transfer_random(self) -> None:
        leader = self.leader()
        if leader is None or leader.raw is None:
            return
        others = sorted(leader.conf.voters - {leader.id})
        if others:
            with contextlib.suppress(ProposalDropped, ValueError):
                leader.raw.transfer_leader(self.rng.choice(others))

    # -- schedules ---------------------------------------------------------------------

    def random_step(self) -> None:
        if len(self.net) > 8 * len(self.nodes):
            self.deliver_random()  # bound the backlog: a network is not a queue to infinity
            return
        roll = self.rng.random() * self._cum[-1]
        for bound, (_, action) in zip(self._cum, self._actions, strict=True):
            if roll < bound:
                action()
                return

    def run_random(self, steps: int) -> None:
        for _ in range(steps):
            self.random_step()

    def settle(self, max_rounds: int = 200) -> None:
        """Delivers everything and runs every driver until quiet (no faults)."""
        for _ in range(max_rounds):
            busy = False
            for node in list(self.nodes.values()):
                busy = self.persist(node) or busy
                while self.take_ready(node):
                    self.persist(node)
                    busy = True
            while self.net:
                self.deliver(self.net.pop(0))
                busy = True
            if not busy:
                return

    def heal_all(self) -> None:
        """Heals the network and restarts every crashed member."""
        self.heal()
        self.paused = set()
        self.tick_rate = {}
        for node in self.nodes.values():
            if node.id in self.removed_ids:
                if node.raw is not None:
                    self._shutdown(node)  # an operator stops a node once it is removed
                node.removed = True
            elif node.raw is None:
                self.restart(node)

    def check_liveness(self, max_ticks: int) -> int:
        """After heal_all: a leader is elected and a new proposal commits within
        max_ticks; returns the ticks it took."""
        marker = f"live-{self.seed}".encode()
        proposed: tuple[SimNode, int] | None = None
        for ticks in range(max_ticks):
            self.settle()
            leader = self.leader()
            if proposed is not None:
                node, index = proposed
                if node.sm.index >= index and marker in node.sm.values:
                    return ticks
                if leader is not node:
                    proposed = None
            if proposed is None and leader is not None:
                new_index = self.propose(leader, marker)
                if new_index is not None:
                    proposed = (leader, new_index)
                    continue
            self.tick_all()
        raise InvariantViolation(f"no progress within {max_ticks} ticks after healing")

    def check_convergence(self, max_ticks: int = 300) -> int:
        """Within max_ticks, a leader exists and every live member has applied exactly
        what it has (the checker already proved equal indexes hold equal states)."""
        for ticks in range(max_ticks):
            self.settle()
            leader = self.leader()
            if leader is not None:
                members = leader.conf.voters | leader.conf.learners
                live = [n for n in self.up() if n.id in members]
                if len({n.sm.index for n in live} | {leader.sm.index}) == 1:
                    return ticks
            self.tick_all()
        indexes = {n.id: n.sm.index for n in self.up()}
        raise InvariantViolation(f"replicas did not converge in {max_ticks} ticks: {indexes}")

    def describe(self) -> str:
        lines = [f"seed={self.seed}"]
        for node in self.nodes.values():
            state = "down" if node.raw is None else node.raw.soft_state().role.name
            hs = node.storage.hard_state
            lines.append(
                f"  node {node.id}: {state} term={hs.term} commit={hs.commit} "
                f"applied={node.sm.index} last={node.storage.last_index()} conf={node.conf}"
            )
        lines.append("  last events: " + "; ".join(self.trace))
        return "\n".join(lines)
