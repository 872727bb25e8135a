"""Snapshots: sending when entries are compacted, installing, the conflict rule of
hashicorp/raft#704, reporting, and restarting from a snapshot (Raft §7)."""

from __future__ import annotations

from raft_helpers import Net, Node, msg, snapshot, storage_with

from kmsd.raft import HardState, MessageType, ProgressState, Role


def compact(node: Node, keep: int = 0) -> int:
    """The driver's snapshot + compaction at the applied index."""
    index = node.applied[-1].index
    node.storage.create_snapshot(index, node.conf, b"state@%d" % index)
    node.storage.compact(index - keep)
    return index


def lagging_cluster() -> tuple[Net, int]:
    """Node 3 missed entries that the leader has compacted away."""
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    for i in range(5):
        leader.raw.propose(b"v%d" % i)
    net.stabilize()
    return net, compact(leader)


def test_leader_sends_a_snapshot_when_entries_are_compacted() -> None:
    net, index = lagging_cluster()
    net.isolated = set()
    net.tick_all()
    snapshots = [m for m in net.delivered if m.type == MessageType.SNAPSHOT]
    assert [(m.dst, m.snapshot.meta.index) for m in snapshots] == [(3, index)]  # type: ignore[union-attr]
    follower = net[3]
    assert follower.storage.snapshot().meta.index == index
    assert follower.raw.status().applied == index
    # Report the stream as done (the driver streams it); replication resumes.
    net[1].raw.report_snapshot(3, ok=True)
    net[1].raw.propose(b"after")
    net.stabilize()
    assert follower.data() == [b"after"]
    assert net[1].raw.status().progress[3].state == ProgressState.REPLICATE


def test_a_failed_snapshot_is_retried() -> None:
    net, index = lagging_cluster()
    net.isolated = set()
    net.drop = lambda m: m.type == MessageType.SNAPSHOT
    net.tick_all()
    leader = net[1]
    assert leader.raw.status().progress[3].state == ProgressState.SNAPSHOT
    leader.raw.report_snapshot(3, ok=False)
    assert leader.raw.status().progress[3].state == ProgressState.PROBE
    net.drop = lambda m: False
    net.tick_all(2)
    assert net[3].storage.snapshot().meta.index == index


def test_snapshot_only_goes_to_a_recently_active_peer() -> None:
    net, index = lagging_cluster()
    leader = net[1]
    net.tick_all(25)  # check-quorum rounds pass with node 3 silent
    leader.raw.report_unreachable(3)  # back to probing: it needs compacted entries
    net.tick_all(3)
    progress = leader.raw.status().progress[3]
    assert not progress.recent_active and progress.state == ProgressState.PROBE
    net.isolated = set()
    net.tick_all()  # its heartbeat answer makes it active: now it gets the snapshot
    assert net[3].storage.snapshot().meta.index == index


def test_conflicting_entry_at_snapshot_index_drops_the_whole_log() -> None:
    """hashicorp/raft#704: keeping a conflicting entry makes the follower reject every
    append and receive the snapshot again, forever."""
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2, 2], hard_state=HardState(2, 0, 3)))
    follower.drain()
    follower.raw.step(msg(MessageType.SNAPSHOT, 1, 2, 3, snapshot=snapshot(5, 3, [1, 2, 3])))
    ready = follower.raw.ready()
    assert ready.snapshot is not None and ready.snapshot.meta.index == 5
    follower.process(ready)
    assert follower.storage.last_index() == 5 and follower.storage.term(5) == 3
    [ack] = [m for m in ready.messages if m.type == MessageType.APPEND_RESP]
    assert ack.index == 5 and not ack.reject


def test_matching_entry_at_snapshot_index_keeps_the_suffix() -> None:
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2, 2], hard_state=HardState(2, 0, 3)))
    follower.drain()
    follower.raw.step(msg(MessageType.SNAPSHOT, 1, 2, 2, snapshot=snapshot(5, 2, [1, 2, 3])))
    ready = follower.raw.ready()
    assert ready.snapshot is None  # nothing to install: the log already has it
    follower.process(ready)
    assert follower.storage.last_index() == 6  # the suffix beyond the snapshot is kept
    assert follower.commit() == 5
    follower.drain()
    assert follower.applied[-1].index == 5  # applied from the log itself


def test_an_old_snapshot_is_ignored() -> None:
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2, 2], hard_state=HardState(2, 0, 6)))
    follower.drain()
    follower.raw.step(msg(MessageType.SNAPSHOT, 1, 2, 2, snapshot=snapshot(4, 2, [1, 2, 3])))
    ready = follower.raw.ready()
    assert ready.snapshot is None
    assert [m.index for m in ready.messages] == [6]


def test_divergent_follower_converges_after_one_snapshot() -> None:
    """A deposed leader holds uncommitted entries; the new leader compacted past them."""
    net = Net.of(3)
    old = net.elect(1)
    net.isolated = {1}
    for _ in range(3):
        old.raw.propose(b"lost")
    old.drain()
    for _ in range(30):
        net[2].tick()
        net[3].tick()
        net.stabilize()
    [new_id] = [i for i in (2, 3) if net[i].role == Role.LEADER]
    new = net[new_id]
    for i in range(4):
        new.raw.propose(b"kept%d" % i)
    net.stabilize()
    compact(new)
    net.isolated = set()
    net.delivered = []
    for _ in range(5):
        net.tick_all()
        new.raw.report_snapshot(1, ok=True)
    assert net.count(MessageType.SNAPSHOT) == 1
    assert b"lost" not in old.storage.snapshot().data
    new.raw.propose(b"tail")
    net.stabilize()
    assert old.storage.last_index() == new.storage.last_index()
    assert old.data()[-1:] == [b"tail"]


def test_restart_from_snapshot_applies_only_after_it() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    for i in range(4):
        leader.raw.propose(b"v%d" % i)
    net.stabilize()
    follower = net[2]
    index = compact(follower, keep=2)  # log keeps 2 entries the snapshot also covers
    leader.raw.propose(b"later")
    net.stabilize()
    follower.applied = []
    follower.restart()
    follower.drain()
    assert follower.applied[0].index == index + 1
    assert follower.data() == [b"later"]
