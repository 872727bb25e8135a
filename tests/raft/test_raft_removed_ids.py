"""Node ids are never reused: removed ids survive snapshots and restarts, and a
committed change that re-adds one is skipped deterministically, never raised on."""

from __future__ import annotations

import dataclasses

import pytest
from raft_helpers import Net, Node, msg

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)
from kmsd.raft.membership import Membership

ADD_VOTER, ADD_LEARNER, REMOVE = (
    ConfChangeType.ADD_VOTER,
    ConfChangeType.ADD_LEARNER,
    ConfChangeType.REMOVE_NODE,
)


def _remove(net: Net, leader: Node, node_id: int) -> None:
    leader.raw.propose_conf_change(ConfChange(REMOVE, node_id))
    net.stabilize()


def _force_conf_change(net: Net, leader: Node, change: ConfChange) -> int:
    """Appends `change` on the leader without its proposal checks: what a leader that
    had forgotten a removal (or an older kmsd) would replicate. Returns its index."""
    leadership = leader.raw._raft.leadership
    assert leadership is not None
    (index,) = leadership._append([(EntryType.CONF_CHANGE, change.encode())])
    leadership.bcast_append()
    net.stabilize()
    return index


def test_the_conf_state_lists_removed_ids() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    _remove(net, leader, 3)
    for node_id in (1, 2):
        conf = net[node_id].raw.status().conf
        assert conf == ConfState(frozenset({1, 2}), frozenset(), frozenset({3}))
        assert net[node_id].conf == conf


@pytest.mark.parametrize("kind", [ADD_LEARNER, ADD_VOTER])
def test_a_committed_re_add_of_a_removed_id_is_skipped_on_every_node(
    kind: ConfChangeType,
) -> None:
    net = Net.of(3)
    leader = net.elect(1)
    _remove(net, leader, 3)
    del net.nodes[3]  # the operator stopped it
    change = ConfChange(kind, 3, b"addr")
    assert leader.raw.conf_change_refusal(change) == "node 3 was removed; ids are never reused"
    index = _force_conf_change(net, leader, change)
    expected = ConfState(frozenset({1, 2}), frozenset(), frozenset({3}))
    for node in net.nodes.values():
        assert node.commit() >= index
        assert any(e.index == index for e in node.applied)  # applied (skipped), no raise
        assert node.conf == expected
        assert node.raw.status().conf == expected
    assert 3 not in leader.raw.status().progress
    # The cluster goes on: writes and the next change commit.
    leader.raw.propose(b"after")
    net.stabilize()
    assert net[2].data()[-1] == b"after"
    leader.raw.propose_conf_change(ConfChange(ADD_LEARNER, 4))
    net.stabilize()
    assert net[2].conf.learners == frozenset({4})


def test_conf_change_refusal_matches_what_apply_skips() -> None:
    membership = Membership(ConfState(frozenset({1, 2}), frozenset({4}), frozenset({3})))
    cases = {
        ConfChange(ADD_LEARNER, 3): False,  # removed
        ConfChange(ADD_VOTER, 3): False,  # removed
        ConfChange(REMOVE, 3): False,  # removed already
        ConfChange(REMOVE, 9): False,  # not a member
        ConfChange(ADD_VOTER, 1): False,  # already a voter
        ConfChange(ADD_LEARNER, 1): False,  # demotion
        ConfChange(ADD_LEARNER, 4): False,  # already a learner
        ConfChange(ADD_VOTER, 4): True,  # promotion
        ConfChange(ADD_LEARNER, 5): True,
        ConfChange(REMOVE, 2): True,
    }
    for change, takes_effect in cases.items():
        assert (membership.refusal(change) is None) is takes_effect, change
        probe = Membership(membership.conf_state())
        assert (probe.apply(change) != membership.conf_state()) is takes_effect, change


def test_removing_the_last_voter_is_skipped_when_applied() -> None:
    membership = Membership(ConfState(frozenset({1})))
    assert membership.apply(ConfChange(REMOVE, 1)) == ConfState(frozenset({1}))


def _snapshot_after_removal() -> tuple[MemoryStorage, int]:
    """Node 1's storage after node 3 was removed, with a snapshot taken after that
    and the log compacted up to it, so a restart replays nothing of the removal."""
    net = Net.of(3)
    leader = net.elect(1)
    _remove(net, leader, 3)
    return leader.storage, _snapshot_and_compact(net, leader)


def _snapshot_and_compact(net: Net, leader: Node) -> int:
    """One more entry committed everywhere reachable, then the leader's snapshot at its
    applied index with the log compacted up to it; returns that index."""
    leader.raw.propose(b"x")
    net.stabilize()
    index = leader.raw.status().applied
    leader.storage.create_snapshot(index, leader.conf, b"state")
    leader.storage.compact(index)
    return index


def test_a_node_restarted_from_a_snapshot_still_refuses_removed_ids() -> None:
    storage, _ = _snapshot_after_removal()
    assert storage.snapshot().meta.conf.removed == frozenset({3})
    node = Node(1, storage=storage, seed=7)
    assert node.raw.status().conf.removed == frozenset({3})
    node.drain()
    node.raw.campaign()
    for m in node.drain():
        if m.type == MessageType.PRE_VOTE:
            node.raw.step(msg(MessageType.PRE_VOTE_RESP, m.dst, 1, m.term))
    for m in node.drain():
        if m.type == MessageType.VOTE:
            node.raw.step(msg(MessageType.VOTE_RESP, m.dst, 1, m.term))
    node.drain()
    assert node.raw.soft_state().leader == 1
    # The NOOP of the new term must commit before a conf change may be proposed.
    last = node.storage.last_index()
    node.raw.step(msg(MessageType.APPEND_RESP, 2, 1, node.term, index=last))
    node.drain()
    with pytest.raises(ValueError, match="removed"):
        node.raw.propose_conf_change(ConfChange(ADD_LEARNER, 3))
    before = node.raw.status().dropped_messages
    node.raw.step(msg(MessageType.VOTE, 3, 1, 99, index=99, log_term=9, context=b"transfer"))
    assert node.raw.status().dropped_messages == before + 1


def test_a_follower_installing_a_snapshot_learns_the_removed_ids() -> None:
    net = Net.of(5)
    leader = net.elect(1)
    net.isolated = {5}
    _remove(net, leader, 4)
    index = _snapshot_and_compact(net, leader)
    assert 4 not in net[5].raw.status().conf.removed
    net.isolated = set()
    net.tick_all(3)  # heartbeats find node 5 behind the compaction: a snapshot
    assert net.count(MessageType.SNAPSHOT) >= 1
    assert net[5].raw.status().conf.removed == frozenset({4})
    assert net[5].raw.status().commit >= index


def test_an_old_snapshot_without_removed_ids_still_loads() -> None:
    storage, index = _snapshot_after_removal()
    old = storage.snapshot()
    legacy = MemoryStorage()
    legacy.apply_snapshot(
        Snapshot(
            SnapshotMeta(index, old.meta.term, ConfState(frozenset({1, 2}))),
            old.data,
        )
    )
    legacy.set_hard_state(storage.initial_state()[0])
    node = Node(1, storage=legacy)
    assert node.raw.status().conf == ConfState(frozenset({1, 2}))
    assert node.raw.conf_change_refusal(ConfChange(ADD_LEARNER, 3)) is None


def test_a_snapshot_naming_a_removed_id_as_member_is_dropped() -> None:
    node = Node(2, [1, 2, 3])
    node.drain()
    bad = Snapshot(
        SnapshotMeta(10, 1, ConfState(frozenset({1, 2, 3}), frozenset(), frozenset({3})))
    )
    message = dataclasses.replace(msg(MessageType.SNAPSHOT, 1, 2, 1), snapshot=bad)
    assert isinstance(message, Message)
    before = node.raw.status().dropped_messages
    node.raw.step(message)
    assert node.raw.status().dropped_messages == before + 1
    assert node.raw.status().commit < 10
