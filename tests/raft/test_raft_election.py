"""Elections: timeouts, vote granting, terms, pre-vote, check-quorum, restarts (Raft §5.2, §5.4.1,
thesis §9.6). Each test states the rule it checks."""

from __future__ import annotations

import random

import pytest
from raft_helpers import Net, Node, msg, storage_with

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfigError,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    MessageType,
    RawNode,
    Role,
    SoftState,
)


def test_config_is_validated_eagerly() -> None:
    with pytest.raises(ConfigError):
        Config(id=0)
    with pytest.raises(ConfigError):
        Config(id=1, election_tick=2, heartbeat_tick=2)
    with pytest.raises(ConfigError):
        Config(id=1, max_inflight_msgs=0)
    with pytest.raises(ConfigError):
        RawNode(Config(id=1, applied=9), MemoryStorage.bootstrapped([1]), random.Random(0))


@pytest.mark.parametrize("seed", range(20))
def test_election_timeout_is_randomized_in_range(seed: int) -> None:
    """A follower campaigns after a timeout in [election_tick, 2 * election_tick)."""
    node = Node(1, [1, 2, 3], seed=seed, election_tick=10, pre_vote=False)
    node.drain()
    elapsed = 0
    while node.role != Role.CANDIDATE and elapsed < 30:
        node.tick()
        elapsed += 1
    assert 10 <= elapsed < 20


def test_timeouts_differ_between_rngs() -> None:
    fired = set()
    for seed in range(30):
        node = Node(1, [1, 2, 3], seed=seed, pre_vote=False)
        node.drain()
        ticks = 0
        while node.role != Role.CANDIDATE:
            node.tick()
            ticks += 1
        fired.add(ticks)
    assert len(fired) > 5


def test_single_node_elects_itself() -> None:
    node = Node(1, [1])
    node.drain()
    node.tick(20)
    assert node.role == Role.LEADER
    assert node.term == 2  # the bootstrap entries are term 1


def test_three_nodes_elect_one_leader() -> None:
    net = Net.of(3)
    net.elect(1)
    assert net.leaders() == [1]
    assert {net[i].leader for i in (1, 2, 3)} == {1}
    assert {net[i].term for i in (1, 2, 3)} == {2}


def test_leader_appends_a_noop_in_its_term() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    noop = leader.applied[-1]
    assert noop.term == 2 and noop.type.name == "NOOP"


def test_randomized_timeouts_elect_a_leader_without_help() -> None:
    net = Net.of(5)
    for _ in range(100):
        net.tick_all()
        if net.leaders():
            break
    assert len(net.leaders()) == 1


@pytest.mark.parametrize(
    ("candidate_index", "candidate_term", "granted"),
    [
        # The voter's log ends at (index 5, term 2): 3 bootstrap entries + terms [2, 2].
        (5, 2, True),  # same last entry
        (6, 2, True),  # longer, same last term
        (4, 2, False),  # shorter, same last term
        (3, 3, True),  # higher last term wins whatever the length
        (9, 1, False),  # lower last term loses whatever the length
    ],
)
def test_vote_requires_an_up_to_date_log(
    candidate_index: int, candidate_term: int, granted: bool
) -> None:
    """§5.4.1: vote only for a candidate whose log is at least as up to date."""
    node = Node(1, storage=storage_with([1, 2, 3], [2, 2], hard_state=HardState(2, 0, 3)))
    node.drain()
    node.raw.step(msg(MessageType.VOTE, 2, 1, 3, index=candidate_index, log_term=candidate_term))
    [response] = [m for m in node.drain() if m.type == MessageType.VOTE_RESP]
    assert response.reject is not granted
    assert node.raw.hard_state().vote == (2 if granted else 0)


def test_one_vote_per_term() -> None:
    node = Node(1, [1, 2, 3])
    node.drain()
    node.raw.step(msg(MessageType.VOTE, 2, 1, 5, index=3, log_term=1))
    node.raw.step(msg(MessageType.VOTE, 3, 1, 5, index=3, log_term=1))
    responses = [m for m in node.drain() if m.type == MessageType.VOTE_RESP]
    assert [(r.dst, r.reject) for r in responses] == [(2, False), (3, True)]
    # A repeated request from the candidate it voted for is granted again (lost reply).
    node.raw.step(msg(MessageType.VOTE, 2, 1, 5, index=3, log_term=1))
    assert [m.reject for m in node.drain()] == [False]


def test_vote_is_persisted_before_the_response_is_released() -> None:
    node = Node(1, [1, 2, 3])
    node.drain()
    node.raw.step(msg(MessageType.VOTE, 2, 1, 5, index=3, log_term=1))
    ready = node.raw.ready()
    assert ready.hard_state == HardState(5, 2, 3)
    assert ready.must_sync and not ready.early_send_ok
    assert [m.type for m in ready.messages] == [MessageType.VOTE_RESP]


def test_restart_keeps_term_and_vote() -> None:
    """The term is never reset on restart (PySyncObj #202), nor the vote (#84)."""
    node = Node(1, [1, 2, 3])
    node.drain()
    node.raw.step(msg(MessageType.VOTE, 2, 1, 5, index=3, log_term=1))
    node.drain()
    node.restart()
    assert (node.term, node.raw.hard_state().vote) == (5, 2)
    node.raw.step(msg(MessageType.VOTE, 3, 1, 5, index=3, log_term=1))
    assert [m.reject for m in node.drain() if m.type == MessageType.VOTE_RESP] == [True]


def test_unpersisted_vote_is_lost_with_its_response() -> None:
    """A crash before persisting drops the vote and its response together."""
    node = Node(1, [1, 2, 3])
    node.drain()
    node.raw.step(msg(MessageType.VOTE, 2, 1, 5, index=3, log_term=1))
    node.raw.ready()  # taken but never persisted: crash
    node.restart()
    assert node.term == 1 and node.raw.hard_state().vote == 0


def test_stale_term_messages_are_ignored() -> None:
    net = Net.of(3)
    net.elect(1)
    follower = net[2]
    before = follower.raw.hard_state()
    follower.raw.step(msg(MessageType.VOTE, 3, 2, 1, index=99, log_term=1))
    follower.raw.step(msg(MessageType.HEARTBEAT_RESP, 3, 2, 1))
    assert follower.raw.hard_state() == before
    assert follower.drain() == []
    last = follower.storage.last_index()
    old_entry = Entry(last + 1, 1, EntryType.NORMAL, b"from an old leader")
    stale = msg(MessageType.APPEND, 3, 2, 1, index=last, log_term=1, entries=(old_entry,))
    follower.raw.step(stale)
    [answer] = follower.drain()  # only tells the stale leader the current term
    assert answer == msg(MessageType.APPEND_RESP, 2, 3, 2)  # no ack, no rejection hint
    assert follower.storage.last_index() == last


def test_stale_leader_learns_the_new_term_and_steps_down() -> None:
    net = Net.of(3)
    net.elect(1)
    net.isolated = {1}
    for _ in range(30):
        net[2].tick()
        net[3].tick()
        net.stabilize()
    [new_leader] = [i for i in (2, 3) if net[i].role == Role.LEADER]
    assert net[1].role == Role.LEADER  # it has not noticed yet
    net.isolated = set()
    net[1].raw.propose(b"stale")
    net.stabilize()
    assert net[1].raw.soft_state().role == Role.FOLLOWER
    assert net[1].term == net[new_leader].term
    assert b"stale" not in net[new_leader].data()


def test_candidate_steps_down_for_a_leader_of_its_term() -> None:
    node = Node(1, [1, 2, 3], pre_vote=False)
    node.drain()
    node.raw.campaign()
    node.drain()
    assert node.role == Role.CANDIDATE
    node.raw.step(msg(MessageType.APPEND, 2, 1, node.term, index=3, log_term=1))
    assert node.raw.soft_state() == SoftState(2, Role.FOLLOWER)


def test_pre_vote_keeps_a_partitioned_node_from_disrupting() -> None:
    """Thesis §9.6: an isolated node neither raises its term nor deposes the leader."""
    net = Net.of(3)
    net.elect(1)
    net.isolated = {3}
    for _ in range(100):
        net.tick_all()
    assert net[3].term == 2 and net[3].role == Role.PRE_CANDIDATE
    net.isolated = set()
    for _ in range(30):
        net.tick_all()
    assert net.leaders() == [1] and {net[i].term for i in (1, 2, 3)} == {2}


def test_without_pre_vote_a_partitioned_node_inflates_its_term() -> None:
    net = Net.of(3, pre_vote=False, check_quorum=False)
    net.elect(1)
    net.isolated = {3}
    for _ in range(100):
        net.tick_all()
    assert net[3].term > 5


def test_pre_vote_does_not_change_term_or_vote() -> None:
    node = Node(1, [1, 2, 3])
    node.drain()
    node.raw.step(msg(MessageType.PRE_VOTE, 2, 1, 3, index=3, log_term=1))
    [response] = node.drain()
    assert response.type == MessageType.PRE_VOTE_RESP and not response.reject
    assert response.term == 3  # answered in the term asked about
    assert node.raw.hard_state() == HardState(1, 0, 3)


def test_check_quorum_leader_steps_down_when_cut_off() -> None:
    net = Net.of(3)
    net.elect(1)
    net.isolated = {1}
    for _ in range(25):
        net.tick_all()
    assert net[1].role == Role.FOLLOWER


def test_check_quorum_followers_ignore_votes_while_leader_is_alive() -> None:
    net = Net.of(3)
    net.elect(1)
    follower = net[2]
    follower.raw.step(msg(MessageType.VOTE, 3, 2, 9, index=100, log_term=9))
    assert follower.term == 2 and follower.drain() == []
    # Once the leader is silent for an election timeout, the request is considered.
    follower.tick(10)
    follower.raw.step(msg(MessageType.VOTE, 3, 2, 9, index=100, log_term=9))
    assert follower.term == 9 and follower.raw.hard_state().vote == 3


def test_leader_ignores_a_higher_term_vote_request_in_lease() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.step(msg(MessageType.VOTE, 3, 1, 9, index=100, log_term=9))
    assert leader.role == Role.LEADER and leader.term == 2


def test_learners_and_non_members_never_campaign() -> None:
    learner = Node(4)  # joined with an empty membership
    learner.tick(100)
    assert learner.role == Role.FOLLOWER and learner.drain() == []


def test_no_campaign_with_committed_conf_changes_not_applied() -> None:
    """etcd's guard: a node whose membership may be stale does not count votes with it."""
    node = Node(1, [1, 2, 3])
    node.drain()
    change = ConfChange(ConfChangeType.ADD_LEARNER, 4).encode()
    entry = Entry(4, 2, EntryType.CONF_CHANGE, change)
    node.raw.step(msg(MessageType.APPEND, 2, 1, 2, index=3, log_term=1, entries=(entry,), commit=4))
    node.process(node.raw.ready())  # persisted; the commit is known
    applying = node.raw.ready()  # hands out entry 4, whose apply is still running
    assert applying.committed_entries == [entry]
    node.tick(40)
    assert node.role == Role.FOLLOWER and not node.raw.has_ready()
    node.process(applying)
    node.tick(40)
    assert node.role in (Role.PRE_CANDIDATE, Role.CANDIDATE)


def test_restart_restores_commit_and_replays_committed_entries() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    leader.raw.propose(b"x")
    net.stabilize()
    follower = net[2]
    applied = [e.index for e in follower.applied]
    follower.applied = []
    follower.restart()
    assert follower.commit() == applied[-1]
    follower.drain()
    assert [e.index for e in follower.applied] == applied  # state machine rebuilt
