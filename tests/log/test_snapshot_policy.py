"""SnapshotPolicy (at least `every` commands, and as many bytes as the last snapshot) and
collect_politely."""

from __future__ import annotations

import pytest

from kmsd.log.base import SnapshotPolicy, collect_politely


def test_the_first_snapshot_comes_after_every_commands() -> None:
    policy = SnapshotPolicy(every=3)
    policy.applied(10)
    policy.applied(10)
    assert not policy.due(2)
    policy.applied(10)
    assert policy.due(3)


def test_a_large_state_puts_the_next_snapshot_off_until_as_many_bytes_were_logged() -> None:
    policy = SnapshotPolicy(every=2)
    policy.taken(1000)
    for _ in range(9):
        policy.applied(100)
    assert not policy.due(9), "900 bytes logged since a 1000-byte snapshot"
    policy.applied(100)
    assert policy.due(10)
    policy.taken(50)
    policy.applied(100)
    assert not policy.due(1), "still at least `every` commands"
    policy.applied(100)
    assert policy.due(2)


def test_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="snapshot_every"):
        SnapshotPolicy(every=0)


def test_collect_politely_keeps_every_chunk_in_order_across_its_pauses() -> None:
    chunks = [bytes([i % 251]) * (i % 7) for i in range(1000)]
    for slice_s in (0.0, 0.0005, 10.0):
        assert collect_politely(iter(chunks), slice_s) == chunks
    assert collect_politely(iter([])) == []
