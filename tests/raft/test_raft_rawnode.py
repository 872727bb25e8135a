"""The RawNode/Ready contract, Status, the storage and the small pure modules, and the
package's import rule (standard library only)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raft_helpers import Net, Node, msg, snapshot, storage_with

from kmsd.raft import (
    CompactedError,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    MessageType,
    Role,
    SnapshotOutOfDateError,
    UnavailableError,
    bootstrap_entries,
)
from kmsd.raft.progress import Inflights, Progress
from kmsd.raft.quorum import VoteResult, committed_index, has_quorum, quorum_age, vote_result

RAFT = Path(__file__).resolve().parents[2] / "kmsd" / "raft"


def test_raft_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    forbidden = {"asyncio", "time", "os", "threading", "socket", "grpc", "google"}
    for path in RAFT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed and top not in forbidden, f"{path.name} imports {name}"


# -- the Ready contract ------------------------------------------------------------


def test_one_ready_at_a_time() -> None:
    node = Node(1, [1, 2, 3])
    ready = node.raw.ready()
    assert not node.raw.has_ready()
    with pytest.raises(RuntimeError):
        node.raw.ready()
    with pytest.raises(RuntimeError):
        node.raw.advance(Node(2, [1, 2, 3]).raw.ready())
    node.raw.advance(ready)


def test_first_ready_replays_the_bootstrap_membership() -> None:
    node = Node(1, [1, 2, 3])
    ready = node.raw.ready()
    assert [e.type for e in ready.committed_entries] == [EntryType.CONF_CHANGE] * 3
    assert ready.entries == [] and ready.hard_state is None
    node.process(ready)
    assert node.conf == ConfState(frozenset({1, 2, 3}))


def test_work_done_while_a_ready_is_persisted_goes_into_the_next_one() -> None:
    net = Net.of(3)
    leader = net.elect(1)
    first_index = leader.raw.propose(b"a")
    ready = leader.raw.ready()
    second_index = leader.raw.propose(b"b")  # while the fsync of "a" runs
    sent = leader.process(ready)
    following = leader.raw.ready()
    assert [e.index for e in ready.entries] == [first_index]
    assert [e.index for e in following.entries] == [second_index]
    net.send(sent + leader.process(following))
    assert net[2].data() == [b"a", b"b"]


def test_entries_replaced_while_being_persisted_are_persisted_again() -> None:
    follower = Node(2, storage=storage_with([1, 2, 3], [], hard_state=HardState(2, 0, 3)))
    follower.drain()
    old = tuple(Entry(i, 2, EntryType.NORMAL, b"old") for i in (4, 5))
    follower.raw.step(msg(MessageType.APPEND, 1, 2, 2, index=3, log_term=1, entries=old, commit=3))
    in_flight = follower.raw.ready()
    new = (Entry(5, 3, EntryType.NORMAL, b"new"),)
    follower.raw.step(msg(MessageType.APPEND, 3, 2, 3, index=4, log_term=2, entries=new, commit=3))
    follower.process(in_flight)  # persists 4 and the stale 5
    follower.drain()
    assert follower.storage.entries(4, 6) == [old[0], new[0]]


def test_soft_state_is_reported_on_change() -> None:
    net = Net.of(3)
    net.elect(1)
    roles = [r.soft_state.role for r in net[1].readies if r.soft_state]
    assert roles[-1] == Role.LEADER


def test_status_tracks_leader_contact() -> None:
    net = Net.of(3)
    net.elect(1)
    follower = net[2]
    assert follower.raw.status().ticks_since_leader_contact == 0
    net.isolated = {1}
    follower.tick(3)
    assert follower.raw.status().ticks_since_leader_contact == 3
    leader_status = net[1].raw.status()
    assert leader_status.ticks_since_leader_contact == 0
    assert set(leader_status.progress) == {1, 2, 3}
    net[1].tick(4)
    assert net[1].raw.status().ticks_since_leader_contact == 4
    assert Node(9, [1, 2, 9]).raw.status().ticks_since_leader_contact is None


def test_restart_refuses_a_commit_beyond_the_log() -> None:
    from kmsd.raft import ConfigError

    storage = storage_with([1, 2, 3], [], hard_state=HardState(2, 0, 9))
    with pytest.raises(ConfigError):
        Node(1, storage=storage)


def test_snapshot_in_ready_comes_without_committed_entries() -> None:
    follower = Node(2, [1, 2, 3])
    follower.drain()
    follower.raw.step(msg(MessageType.SNAPSHOT, 1, 2, 3, snapshot=snapshot(10, 3, [1, 2, 3])))
    ready = follower.raw.ready()
    assert ready.snapshot is not None and ready.committed_entries == []
    assert ready.hard_state == HardState(3, 0, 10)
    follower.process(ready)
    assert follower.raw.status().applied == 10


# -- MemoryStorage -----------------------------------------------------------------


def entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(i, term, EntryType.NORMAL, b"%d" % i) for i in range(lo, hi)]


def test_memory_storage_reads_and_bounds() -> None:
    storage = MemoryStorage()
    storage.append(entries(1, 6))
    assert (storage.first_index(), storage.last_index()) == (1, 5)
    assert storage.entries(2, 4) == entries(2, 4)
    assert storage.term(0) == 0
    with pytest.raises(UnavailableError):
        storage.entries(4, 8)
    with pytest.raises(UnavailableError):
        storage.term(6)
    storage.create_snapshot(3, ConfState(frozenset({1})), b"s")
    storage.compact(3)
    with pytest.raises(CompactedError):
        storage.entries(3, 5)
    with pytest.raises(CompactedError):
        storage.term(2)
    assert storage.term(3) == 1 and storage.first_index() == 4


def test_memory_storage_append_truncates_conflicts_and_rejects_gaps() -> None:
    storage = MemoryStorage()
    storage.append(entries(1, 6))
    storage.append(entries(3, 5, term=2))
    assert storage.last_index() == 4 and storage.term(3) == 2
    with pytest.raises(ValueError):
        storage.append(entries(7, 8))
    with pytest.raises(ValueError):
        storage.append([Entry(5, 2), Entry(7, 2)])


def test_memory_storage_snapshot_rules() -> None:
    storage = MemoryStorage()
    storage.append(entries(1, 6))
    with pytest.raises(ValueError):
        storage.compact(2)  # nothing covers it
    snap = storage.create_snapshot(4, ConfState(frozenset({1})), b"s")
    with pytest.raises(SnapshotOutOfDateError):
        storage.create_snapshot(3, ConfState(frozenset({1})), b"s")
    with pytest.raises(SnapshotOutOfDateError):
        storage.apply_snapshot(snap)
    storage.apply_snapshot(snapshot(9, 3, [1]))
    assert (storage.first_index(), storage.last_index(), storage.term(9)) == (10, 9, 3)
    assert storage.initial_state()[1] == ConfState(frozenset({1}))


def test_bootstrap_entries() -> None:
    log, hard_state = bootstrap_entries([3, 1, 2])
    assert [e.index for e in log] == [1, 2, 3] and hard_state == HardState(1, 0, 3)
    with pytest.raises(ValueError):
        bootstrap_entries([])


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 5)), max_size=30))
def test_memory_storage_matches_a_list_model(appends: list[tuple[int, int]]) -> None:
    storage = MemoryStorage()
    model: list[Entry] = []
    for start, count in appends:
        start = min(start, len(model) + 1)
        batch = [Entry(i, start, EntryType.NORMAL, b"") for i in range(start, start + count)]
        storage.append(batch)
        model = model[: start - 1] + batch
    assert storage.last_index() == len(model)
    assert storage.entries(1, len(model) + 1) == model


# -- pure modules --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("voters", "match", "expected"),
    [
        ({1}, {1: 5}, 5),
        ({1, 2, 3}, {1: 5, 2: 3, 3: 1}, 3),
        ({1, 2, 3, 4}, {1: 5, 2: 3, 3: 1, 4: 9}, 3),
        ({1, 2, 3, 4, 5}, {1: 5, 2: 3}, 0),
        (set(), {}, 0),
    ],
)
def test_committed_index(voters: set[int], match: dict[int, int], expected: int) -> None:
    assert committed_index(voters, match) == expected


@pytest.mark.parametrize(
    ("votes", "result"),
    [
        ({1: True}, VoteResult.PENDING),
        ({1: True, 2: True}, VoteResult.WON),
        ({1: True, 2: False}, VoteResult.PENDING),
        ({1: True, 2: False, 3: False}, VoteResult.LOST),
        ({9: True, 8: True, 1: True}, VoteResult.PENDING),  # non-voters never count
    ],
)
def test_vote_result(votes: dict[int, bool], result: VoteResult) -> None:
    assert vote_result({1, 2, 3}, votes) == result


def test_quorum_helpers() -> None:
    assert has_quorum({1, 2, 3}, {1, 3, 7}) and not has_quorum({1, 2, 3}, {1, 7})
    assert quorum_age({1, 2, 3}, {1: 0, 2: 5, 3: 9}) == 5
    assert quorum_age({1, 2, 3}, {1: 0}) is None


def test_inflights_and_progress_transitions() -> None:
    inflights = Inflights(2)
    inflights.add(3)
    inflights.add(5)
    assert inflights.full()
    inflights.free_le(4)
    assert len(inflights) == 1
    progress = Progress(next_index=10, max_inflight=2, now=0)
    assert not progress.is_paused()
    progress.sent_append(None)
    assert progress.is_paused()  # one probe at a time
    assert not progress.maybe_decrease_to(3, 2)  # answers an older probe
    assert progress.maybe_decrease_to(9, 4) and progress.next == 5
    assert progress.maybe_update(6) and progress.next == 7
    progress.become_replicate()
    progress.sent_append(8)
    progress.sent_append(9)
    assert progress.is_paused() and progress.next == 10
    progress.become_snapshot(20)
    assert progress.is_paused()
    progress.become_probe()
    assert progress.next == 21
