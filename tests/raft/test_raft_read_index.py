"""Linearizable reads through ReadIndex (thesis §6.4) on leaders and followers."""

from __future__ import annotations

import pytest
from raft_helpers import Net, Node, msg

from kmsd.raft import MessageType, ReadIndexDropped, ReadState, Role


def test_leader_read_needs_a_heartbeat_quorum() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.read_index(b"r1")
    assert leader.read_states == []
    heartbeats = [m for m in leader.drain() if m.type == MessageType.HEARTBEAT]
    assert {m.dst for m in heartbeats} == {2, 3} and all(m.context for m in heartbeats)
    follower = net[2]
    follower.raw.step(heartbeats[0])
    for m in follower.drain():
        leader.raw.step(m)
    leader.drain()
    assert leader.read_states == [ReadState(leader.commit(), b"r1")]


def test_isolated_leader_never_confirms_a_read() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {1}
    leader.raw.read_index(b"r1")
    for _ in range(5):
        leader.tick()
        net.stabilize()
    assert leader.read_states == []


def test_read_waits_for_a_commit_in_the_leaders_term() -> None:
    net = Net.of(3)
    node = net[1]
    node.drain()
    node.raw.campaign()
    net.drop = lambda m: m.type == MessageType.APPEND  # the no-op cannot commit
    net.stabilize()
    assert node.role == Role.LEADER
    node.raw.read_index(b"early")
    net.stabilize()
    assert node.read_states == []
    net.drop = lambda m: False
    node.tick()
    net.stabilize()
    assert node.read_states == [ReadState(node.commit(), b"early")]
    assert node.commit() == 4 and node.storage.term(4) == 2  # the no-op of term 2


def test_follower_read_is_forwarded_and_answered() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.propose(b"x")
    net.stabilize()
    follower = net[3]
    follower.raw.read_index(b"f1")
    net.stabilize()
    assert follower.read_states == [ReadState(leader.commit(), b"f1")]
    assert follower.raw.status().applied >= leader.commit()


def test_read_without_a_known_leader_is_refused() -> None:
    node = Node(1, [1, 2, 3])
    with pytest.raises(ReadIndexDropped):
        node.raw.read_index(b"r")


def test_single_voter_reads_immediately() -> None:
    node = Node(1, [1])
    node.drain()
    node.tick(20)
    node.drain()
    node.raw.read_index(b"r")
    node.drain()
    assert node.read_states == [ReadState(node.commit(), b"r")]


def test_reads_from_different_followers_with_the_same_context_are_kept_apart() -> None:
    net = Net.of(3)
    net.elect(1)
    net[2].raw.read_index(b"same")
    net[3].raw.read_index(b"same")
    net.stabilize()
    assert [s.context for s in net[2].read_states] == [b"same"]
    assert [s.context for s in net[3].read_states] == [b"same"]


def test_a_learners_ack_does_not_confirm_a_read() -> None:
    from raft_helpers import add_learner

    net = Net.of(3)
    leader = net.elect(1)
    add_learner(net, leader, 4)
    net.isolated = {2, 3}
    leader.raw.read_index(b"r")
    net.stabilize()
    assert leader.read_states == []


def test_a_bogus_heartbeat_context_is_ignored() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.read_index(b"r")
    leader.drain()
    leader.raw.step(msg(MessageType.HEARTBEAT_RESP, 2, 1, 2, context=b"junk"))
    leader.raw.step(msg(MessageType.HEARTBEAT_RESP, 2, 1, 2, context=bytes(8)))
    leader.drain()
    assert leader.read_states == []
