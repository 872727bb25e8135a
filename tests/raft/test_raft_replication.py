"""Log replication and commitment (Raft §5.3, §5.4.2, etcd #14370) and the Ready contract."""

from __future__ import annotations

import pytest
from raft_helpers import Net, Node, msg, storage_with

from kmsd.raft import (
    Entry,
    EntryType,
    HardState,
    MessageType,
    ProgressState,
    ProposalDropped,
    Role,
)


def test_proposals_replicate_in_order_to_every_node() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    for value in (b"a", b"b", b"c"):
        leader.raw.propose(value)
    net.stabilize()
    for node in net.nodes.values():
        assert node.data() == [b"a", b"b", b"c"]
    assert len({tuple(n.applied) for n in net.nodes.values()}) == 1


def test_propose_on_a_follower_is_dropped() -> None:
    net = Net.of(3)
    net.elect(1)
    with pytest.raises(ProposalDropped):
        net[2].raw.propose(b"x")


def test_propose_returns_the_entry_index() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    index = leader.raw.propose(b"x")
    assert leader.raw.propose_batch([b"y", b"z"]) == [index + 1, index + 2]


def test_single_node_applies_only_after_its_own_fsync() -> None:
    """etcd #14370: a one-voter leader must not hand out an entry as committed in the
    same Ready that asks to persist it."""
    node = Node(1, [1])
    node.drain()
    node.tick(20)
    node.drain()
    index = node.raw.propose(b"x")
    first = node.raw.ready()
    assert [e.index for e in first.entries] == [index]
    assert first.committed_entries == [] and first.hard_state is None
    node.process(first)  # persisted, then advance(): the leader counts itself now
    second = node.raw.ready()
    assert second.hard_state is not None and second.hard_state.commit == index
    assert [e.index for e in second.committed_entries] == [index]


def test_leader_counts_itself_only_after_advance() -> None:
    """A leader may send before its own fsync; then only followers' acks count."""
    net = Net.of(3)
    leader = net.elect(1)
    index = leader.raw.propose(b"x")
    ready = leader.raw.ready()
    assert ready.early_send_ok  # APPENDs may leave before the fsync
    net.isolated = {3}
    net[2].raw.step(next(m for m in ready.messages if m.dst == 2))
    for m in net[2].drain():
        leader.raw.step(m)
    status = leader.raw.status()
    assert status.progress[1].match < index  # not persisted: not counted
    assert status.progress[2].match == index
    assert status.commit < index  # one durable copy of three is no quorum
    leader.process(ready)  # fsync done + advance(): now two of three
    assert leader.raw.status().commit == index


def test_follower_applies_only_after_its_own_fsync() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    follower = net[2]
    commit = leader.commit()
    entry = Entry(commit + 1, 2, EntryType.NORMAL, b"x")
    follower.raw.step(
        msg(
            MessageType.APPEND,
            1,
            2,
            2,
            index=commit,
            log_term=2,
            entries=(entry,),
            commit=commit + 1,
        )
    )
    ready = follower.raw.ready()
    assert ready.entries == [entry]
    assert ready.hard_state is not None and ready.hard_state.commit == commit + 1
    assert ready.committed_entries == []  # not durable here yet
    follower.process(ready)
    assert follower.raw.ready().committed_entries == [entry]


def test_commit_only_change_needs_no_fsync() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    start = len(net[2].readies)
    leader.raw.propose(b"x")
    net.stabilize()
    later = net[2].readies[start:]
    commit_only = [r for r in later if r.hard_state is not None and not r.entries]
    assert commit_only and not any(r.must_sync for r in commit_only)
    assert all(r.must_sync for r in later if r.entries)


def test_follower_truncates_a_conflicting_uncommitted_suffix() -> None:
    """§5.3: on a conflict, delete the entry and all that follow, then append."""
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2, 2], hard_state=HardState(3, 0, 3)))
    follower.drain()
    new = (Entry(5, 3, EntryType.NORMAL, b"n5"), Entry(6, 3, EntryType.NORMAL, b"n6"))
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 3, index=4, log_term=2, entries=new, commit=3))
    follower.drain()
    assert follower.storage.last_index() == 6
    assert follower.storage.entries(4, 7)[1:] == list(new)


def test_append_with_an_already_present_prefix_does_not_truncate() -> None:
    """A delayed, shorter APPEND must not cut entries appended by a later one."""
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2, 2], hard_state=HardState(2, 0, 3)))
    follower.drain()
    old = (Entry(4, 2, EntryType.NORMAL, b"e4t2"),)
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 2, index=3, log_term=1, entries=old, commit=3))
    follower.drain()
    assert follower.storage.last_index() == 6


def test_append_below_the_commit_index_cannot_rewrite_it() -> None:
    follower = Node(2, storage=storage_with([1, 2, 3], [2, 2], hard_state=HardState(2, 0, 5)))
    follower.drain()
    bogus = (Entry(5, 3, EntryType.NORMAL, b"evil"),)
    follower.raw.step(
        msg(MessageType.APPEND, 1, 2, 3, index=4, log_term=2, entries=bogus, commit=5)
    )
    [response] = follower.drain()
    assert follower.storage.term(5) == 2
    assert (response.type, response.index, response.reject) == (MessageType.APPEND_RESP, 5, False)


def test_mismatch_is_rejected_with_a_hint() -> None:
    """Fast back-off: the hint skips every entry of a term the leader cannot match."""
    follower = Node(2, storage=storage_with([1, 2, 3], [2] * 20, hard_state=HardState(3, 0, 3)))
    follower.drain()
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 3, index=23, log_term=3, commit=3))
    [reject] = follower.drain()
    assert reject.reject and reject.index == 23
    assert (reject.reject_hint, reject.log_term) == (23, 2)
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 3, index=30, log_term=3, commit=3))
    [reject] = follower.drain()
    assert (reject.reject_hint, reject.log_term) == (23, 2)  # capped at its last index


def test_a_divergent_follower_is_repaired_in_few_round_trips() -> None:
    """Leader: 30 entries of term 3. Follower: 30 entries of term 2 at the same indexes."""
    leader_log = storage_with([1, 2, 3], [3] * 30, hard_state=HardState(3, 0, 3))
    stale_log = storage_with([1, 2, 3], [2] * 30, hard_state=HardState(3, 0, 3))
    net = Net(
        [
            Node(1, storage=leader_log, pre_vote=False),
            Node(2, storage=stale_log),
            Node(3, storage=storage_with([1, 2, 3], [3] * 30, hard_state=HardState(3, 0, 3))),
        ]
    )
    net.elect(1)
    rejects = [m for m in net.delivered if m.type == MessageType.APPEND_RESP and m.reject]
    assert [m.src for m in rejects] == [2]  # one rejection, then one repair
    assert net[2].storage.term(33) == 3 and net[2].storage.last_index() == 34


def test_figure_8_previous_term_entries_commit_only_indirectly() -> None:
    """§5.4.2: a leader never commits an earlier term's entry by counting replicas."""
    voters = [1, 2, 3, 4, 5]
    leader = Node(
        1,
        storage=storage_with(voters, [2], hard_state=HardState(3, 0, 5)),
        pre_vote=False,
    )
    leader.drain()
    leader.raw.campaign()
    leader.drain()
    for voter in (2, 3):
        leader.raw.step(msg(MessageType.VOTE_RESP, voter, 1, 4))
    leader.drain()
    assert leader.role == Role.LEADER and leader.storage.term(7) == 4  # the no-op
    for voter in (2, 3):
        leader.raw.step(msg(MessageType.APPEND_RESP, voter, 1, 4, index=6))
    leader.drain()
    assert leader.commit() == 5  # entry 6 (term 2) is on a majority, yet not committed
    leader.raw.step(msg(MessageType.APPEND_RESP, 2, 1, 4, index=7))
    leader.drain()
    assert leader.commit() == 5
    leader.raw.step(msg(MessageType.APPEND_RESP, 3, 1, 4, index=7))
    leader.drain()
    assert leader.commit() == 7  # the term-4 entry commits, and 6 with it


def test_figure_8_an_uncommitted_old_entry_can_be_overwritten() -> None:
    """The other half of Figure 8: S5, with a newer last term, wins and overwrites."""
    voters = [1, 2, 3, 4, 5]
    logs = {1: [2], 2: [2], 3: [2], 4: [], 5: [3]}
    net = Net(
        Node(i, storage=storage_with(voters, logs[i], hard_state=HardState(3, 0, 5)), seed=i)
        for i in voters
    )
    net.elect(5)  # its last term (3) beats the majority's (2): everyone votes for it
    assert {net[i].storage.term(6) for i in voters} == {3}


def test_probe_state_sends_one_append_at_a_time() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    leader.raw.report_unreachable(3)
    for value in (b"a", b"b", b"c"):
        leader.raw.propose(value)
    appends = [m for m in leader.drain() if m.type == MessageType.APPEND and m.dst == 3]
    assert len(appends) == 1
    assert leader.raw.status().progress[3].state == ProgressState.PROBE


def test_replicate_state_bounds_inflight_appends() -> None:
    net = Net.of(3, max_inflight_msgs=2)
    leader = net.elect(1)
    net.isolated = {3}
    for i in range(5):
        leader.raw.propose(f"v{i}".encode())
    appends = [m for m in leader.drain() if m.type == MessageType.APPEND and m.dst == 3]
    assert len(appends) == 2
    assert leader.raw.status().progress[3].inflight == 2


def test_max_size_per_msg_splits_appends() -> None:
    net = Net.of(2, max_size_per_msg=100)
    leader = net.elect(1)
    net.isolated = {2}
    leader.raw.report_unreachable(2)
    net.isolated = set()
    for _ in range(6):
        leader.raw.propose(bytes(60))
    net.stabilize()
    sizes = [len(m.entries) for m in net.delivered if m.type == MessageType.APPEND and m.entries]
    assert sizes and max(sizes) == 1
    assert net[2].data() == [bytes(60)] * 6


def test_heartbeat_commit_is_capped_by_the_followers_match() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    net.isolated = {3}
    leader.raw.propose(b"x")
    net.stabilize()
    leader.tick()
    heartbeats = {m.dst: m.commit for m in leader.drain() if m.type == MessageType.HEARTBEAT}
    assert heartbeats[2] == leader.commit()
    assert heartbeats[3] < leader.commit()


def test_messages_of_a_vote_are_not_early_sendable() -> None:
    node = Node(1, [1, 2, 3], pre_vote=False)
    node.drain()
    node.raw.campaign()
    ready = node.raw.ready()
    assert ready.must_sync and not ready.early_send_ok
    assert {m.type for m in ready.messages} == {MessageType.VOTE}


def test_follower_acks_are_never_early_sendable() -> None:
    net = Net.of(3)
    net.elect(1)
    net[1].raw.propose(b"x")
    for m in net[1].drain():
        if m.dst == 2:
            net[2].raw.step(m)
    ready = net[2].raw.ready()
    assert any(m.type == MessageType.APPEND_RESP for m in ready.messages)
    assert not ready.early_send_ok


def test_an_ack_of_entries_replaced_before_persisting_is_never_sent() -> None:
    """Found by the simulator: a follower queues an ack for leader A's entries, then a
    newer leader's append replaces them before the next Ready is persisted. Sending
    that ack would claim entries this node never wrote; it must be withdrawn."""
    follower = Node(2, storage=storage_with([1, 2, 3], [], hard_state=HardState(2, 0, 3)))
    follower.drain()
    from_a = tuple(Entry(i, 2, EntryType.NORMAL, b"a") for i in (4, 5, 6))
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 2, index=3, log_term=1, entries=from_a))
    from_b = (Entry(4, 3, EntryType.NORMAL, b"b"),)
    follower.raw.step(msg(MessageType.APPEND, 3, 2, 3, index=3, log_term=1, entries=from_b))
    ready = follower.raw.ready()
    assert ready.entries == list(from_b)
    acks = [(m.dst, m.index) for m in ready.messages if m.type == MessageType.APPEND_RESP]
    assert acks == [(3, 4)]  # the ack of A's 4..6 was withdrawn
