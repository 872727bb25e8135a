"""Membership changes (single-server, learners first, apply-time) and leadership transfer."""

from __future__ import annotations

import pytest
from raft_helpers import Net, Node, add_learner, msg

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    MessageType,
    ProposalDropped,
    Role,
)

ADD_VOTER, ADD_LEARNER, REMOVE = (
    ConfChangeType.ADD_VOTER,
    ConfChangeType.ADD_LEARNER,
    ConfChangeType.REMOVE_NODE,
)


def test_conf_change_encoding_round_trips() -> None:
    change = ConfChange(ADD_LEARNER, 7, b"10.0.0.7:7000")
    assert ConfChange.decode(change.encode()) == change
    for bad in (b"", b"\x02" + change.encode()[1:], change.encode()[:5]):
        with pytest.raises(ValueError):
            ConfChange.decode(bad)


def test_learner_receives_the_log_but_never_votes_nor_counts() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    learner = add_learner(net, leader, 4)
    add_learner(net, leader, 5)
    assert learner.conf == ConfState(frozenset({1, 2, 3}), frozenset({4, 5}))
    leader.raw.propose(b"x")
    net.stabilize()
    assert learner.data() == [b"x"]
    # With both other voters cut off, the learners' acks cannot make a quorum
    # (leader + two learners would be a majority of all five members).
    net.isolated = {2, 3}
    index = leader.raw.propose(b"y")
    net.stabilize()
    assert learner.storage.last_index() >= index
    assert leader.commit() < index
    # A learner is never asked for a vote and never campaigns.
    learner.tick(100)
    assert learner.role == Role.FOLLOWER
    net.isolated = set()
    net.stabilize()


def test_promoted_learner_counts_for_quorum() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    add_learner(net, leader, 4)
    leader.raw.propose_conf_change(ConfChange(ADD_VOTER, 4))
    net.stabilize()
    assert leader.conf.voters == frozenset({1, 2, 3, 4})
    net.isolated = {3}
    index = leader.raw.propose(b"x")
    net.stabilize()
    assert leader.commit() >= index  # 1, 2 and 4 make a quorum of four


def test_one_conf_change_at_a_time() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {2, 3}
    leader.raw.propose_conf_change(ConfChange(ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped):
        leader.raw.propose_conf_change(ConfChange(ADD_LEARNER, 5))
    net.isolated = set()
    net.stabilize()
    leader.raw.propose_conf_change(ConfChange(ADD_LEARNER, 5))  # applied: allowed now


def test_no_conf_change_before_the_leader_committed_in_its_term() -> None:
    net = Net.of(3)
    net.isolated = {2, 3}
    node = net[1]
    node.drain()
    node.raw.campaign()
    node.drain()
    for voter in (2, 3):  # win the election by hand, nobody acks the no-op
        node.raw.step(msg(MessageType.PRE_VOTE_RESP, voter, 1, node.term + 1))
    node.drain()
    for voter in (2, 3):
        node.raw.step(msg(MessageType.VOTE_RESP, voter, 1, node.term))
    assert node.role == Role.LEADER
    with pytest.raises(ProposalDropped):
        node.raw.propose_conf_change(ConfChange(ADD_LEARNER, 4))


@pytest.mark.parametrize(
    "change",
    [
        ConfChange(ADD_VOTER, 2),  # already a voter
        ConfChange(ADD_LEARNER, 2),  # demotion is not supported
        ConfChange(REMOVE, 9),  # not a member
    ],
)
def test_invalid_conf_changes_are_refused(change: ConfChange) -> None:
    net = Net.of(3)
    leader = net.elect(1)
    with pytest.raises(ValueError):
        leader.raw.propose_conf_change(change)


def test_removed_ids_are_never_reused() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.propose_conf_change(ConfChange(REMOVE, 3))
    net.stabilize()
    with pytest.raises(ValueError):
        leader.raw.propose_conf_change(ConfChange(ADD_LEARNER, 3))


def test_removed_leader_steps_down() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.propose_conf_change(ConfChange(REMOVE, 1))
    net.stabilize()
    assert leader.role == Role.FOLLOWER
    assert net[2].conf.voters == frozenset({2, 3})
    del net.nodes[1]  # the operator stops it
    for _ in range(40):
        net.tick_all()
        if net.leaders():
            break
    assert len(net.leaders()) == 1
    new = net[net.leaders()[0]]
    new.raw.propose(b"after")
    net.stabilize()
    assert new.data()[-1] == b"after"


def test_messages_from_a_removed_node_are_refused() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.propose_conf_change(ConfChange(REMOVE, 3))
    net.stabilize()
    follower = net[2]
    before = follower.raw.status().dropped_messages
    follower.raw.step(msg(MessageType.VOTE, 3, 2, 99, index=99, log_term=9, context=b"transfer"))
    follower.raw.step(msg(MessageType.HEARTBEAT_RESP, 3, 2, follower.term))
    assert follower.term == 2
    assert follower.raw.status().dropped_messages == before + 2


def test_unknown_ids_may_campaign_and_lead_but_not_answer() -> None:
    """Thesis §4.2.1: a lagging node must accept vote requests and appends from a
    member it has not heard of yet; anything else from an unknown id is dropped."""
    node = Node(3, [1, 2, 3])
    node.drain()  # no leader heard from: votes are considered
    node.raw.step(msg(MessageType.HEARTBEAT_RESP, 9, 3, 1))
    node.raw.step(msg(MessageType.READ_INDEX_RESP, 9, 3, 1, index=3))
    assert node.raw.status().dropped_messages == 2
    node.raw.step(msg(MessageType.VOTE, 9, 3, 5, index=3, log_term=1))
    [vote] = node.drain()
    assert not vote.reject and node.raw.hard_state().vote == 9


def test_a_lagging_node_votes_for_a_member_it_does_not_know_yet() -> None:
    """Voters {1,2,3,4}; node 1 is gone; node 3 has not applied node 4's addition and
    node 4 alone has the longest log. Only 4 can win: if 3 refused unknown ids, the
    cluster would be wedged for good."""
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    add_learner(net, leader, 4)
    leader.raw.propose_conf_change(ConfChange(ADD_VOTER, 4))
    net.stabilize()
    net.isolated = {2, 3}
    leader.raw.propose(b"only on 4")  # makes 4 the most up-to-date
    net.stabilize()
    assert net[4].storage.last_index() > net[2].storage.last_index()
    del net.nodes[1]
    net.isolated = set()
    assert 4 not in net[3].conf.voters | net[3].conf.learners
    for _ in range(60):
        net.tick_all()
        if net.leaders():
            break
    assert net.leaders() == [4]
    net[4].raw.propose(b"unwedged")
    net.stabilize()
    assert net[3].data()[-1] == b"unwedged"
    assert 4 in net[3].conf.voters


def test_transfer_to_a_caught_up_follower() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.transfer_leader(2)
    net.stabilize()
    assert net.leaders() == [2]
    assert net.count(MessageType.TIMEOUT_NOW) == 1
    assert net[2].term == 3


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    for i in range(3):
        leader.raw.propose(b"v%d" % i)
    net.stabilize()
    leader.raw.transfer_leader(3)
    with pytest.raises(ProposalDropped):
        leader.raw.propose(b"during transfer")
    assert leader.raw.status().lead_transferee == 3
    net.isolated = set()
    net.tick_all()
    assert net.leaders() == [3]
    assert net[3].data() == [b"v0", b"v1", b"v2"]


def test_transfer_is_abandoned_after_an_election_timeout() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    leader.raw.transfer_leader(3)
    net.tick_all(10)
    assert leader.role == Role.LEADER
    assert leader.raw.status().lead_transferee == 0
    leader.raw.propose(b"accepted again")


def test_transfer_to_a_non_voter_or_from_a_follower_is_refused() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    add_learner(net, leader, 4)
    with pytest.raises(ValueError):
        leader.raw.transfer_leader(4)
    with pytest.raises(ProposalDropped):
        net[2].raw.transfer_leader(3)


def test_timeout_now_is_only_honoured_from_the_leader() -> None:
    net = Net.of(3)
    net.elect(1)
    follower = net[2]
    follower.raw.step(msg(MessageType.TIMEOUT_NOW, 3, 2, 2))
    assert follower.role == Role.FOLLOWER and follower.term == 2
