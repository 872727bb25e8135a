"""The `Storage` the core reads its durable log from, and `MemoryStorage`.

The core only ever *reads* Storage; the driver writes it, and only with data it
has already made durable (its WAL is fsynced first). So everything a Storage
returns is, by contract, persisted. `MemoryStorage` is the driver's in-memory
mirror of its WAL and the storage of the simulated tests.

Ownership: the lists returned by `entries` belong to the caller; the Entry values
are immutable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .errors import CompactedError, SnapshotOutOfDateError, UnavailableError
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)


def bootstrap_entries(voters: Iterable[int]) -> tuple[list[Entry], HardState]:
    """The log and HardState every founding member of a new cluster starts with.

    The founding membership is written as committed ADD_VOTER entries at term 1 (as
    etcd's Bootstrap does), not as initial state, so a node that joins later learns
    it by replaying the log like everything else. Every founding node must use the
    same voter set; nodes that join later start from an empty storage.
    """
    ids = sorted(set(voters))
    if not ids or ids[0] <= 0:
        raise ValueError("bootstrap needs at least one positive node id")
    entries = [
        Entry(i, 1, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_VOTER, node).encode())
        for i, node in enumerate(ids, start=1)
    ]
    return entries, HardState(term=1, vote=0, commit=len(entries))


class Storage(Protocol):
    """Read access to the persisted log (etcd's Storage interface)."""

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted HardState and the membership of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with index in [lo, hi). CompactedError if lo <= the snapshot index,
        UnavailableError if hi > last_index() + 1."""
        ...

    def term(self, index: int) -> int:
        """The term of the entry at `index`, which may be the snapshot index.
        CompactedError below it, UnavailableError beyond the last index."""
        ...

    def first_index(self) -> int:
        """The first index kept in the log (the snapshot index + 1)."""
        ...

    def last_index(self) -> int:
        """The last index in the log (the snapshot index when the log is empty)."""
        ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot; may raise SnapshotTemporarilyUnavailableError."""
        ...


class MemoryStorage:
    """A Storage held in memory, with the write methods a driver needs.

    Invariant: `_ents[0]` is a placeholder at the compaction point (its index and
    term are those of the last compacted entry); real entries follow densely.
    """

    def __init__(self) -> None:
        """An empty log (a node that joins an existing cluster starts so)."""
        self._hard_state = HardState()
        self._snapshot = Snapshot(SnapshotMeta(0, 0, ConfState()))
        self._ents: list[Entry] = [Entry(0, 0, EntryType.NOOP)]

    @classmethod
    def bootstrapped(cls, voters: Iterable[int]) -> MemoryStorage:
        """The storage of a founding member (see `bootstrap_entries`)."""
        storage = cls()
        entries, hard_state = bootstrap_entries(voters)
        storage.append(entries)
        storage.set_hard_state(hard_state)
        return storage

    # -- Storage ---------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf

    def entries(self, lo: int, hi: int) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(f"index {lo} is compacted (first is {offset + 1})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"index {hi - 1} is beyond the last {self.last_index()}")
        if lo >= hi:
            return []
        return self._ents[lo - offset : hi - offset]

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(f"index {index} is compacted")
        if index - offset >= len(self._ents):
            raise UnavailableError(f"index {index} is beyond the last {self.last_index()}")
        return self._ents[index - offset].term

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- writes (the driver's side) -------------------------------------------

    @property
    def hard_state(self) -> HardState:
        """The last HardState set."""
        return self._hard_state

    def set_hard_state(self, hard_state: HardState) -> None:
        """Records the HardState (after the driver persisted it)."""
        self._hard_state = hard_state

    def append(self, entries: list[Entry]) -> None:
        """Appends entries; an entry at an existing index replaces it and everything
        after it (Raft's conflict truncation). Already-compacted ones are skipped."""
        if not entries:
            return
        for prev, cur in zip(entries, entries[1:], strict=False):
            if cur.index != prev.index + 1:
                raise ValueError("entries must have consecutive indexes")
        first = self.first_index()
        if entries[-1].index < first:
            return
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = self._ents[0].index
        position = entries[0].index - offset
        if position > len(self._ents):
            raise ValueError(
                f"gap: appending index {entries[0].index} after last {self.last_index()}"
            )
        # In place: rebuilding the list would copy the whole retained log (thousands
        # of entries between compactions) on every append.
        del self._ents[position:]
        self._ents.extend(entries)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replaces the whole log with `snapshot` (the core asks for this only when the
        log does not already hold the snapshot's last entry)."""
        if snapshot.meta.index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot {snapshot.meta.index} is not newer than {self._snapshot.meta.index}"
            )
        self._snapshot = snapshot
        self._ents = [Entry(snapshot.meta.index, snapshot.meta.term, EntryType.NOOP)]

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        """Records a snapshot of the state machine at applied `index` and returns it."""
        if index <= self._snapshot.meta.index:
            raise SnapshotOutOfDateError(
                f"snapshot {index} is not newer than {self._snapshot.meta.index}"
            )
        term = self.term(index)
        self._snapshot = Snapshot(SnapshotMeta(index, term, conf), data)
        return self._snapshot

    def compact(self, index: int) -> None:
        """Drops the entries up to `index`, which a snapshot must already cover (so a
        lagging follower can always be served by either the log or the snapshot)."""
        offset = self._ents[0].index
        if index <= offset:
            raise CompactedError(f"index {index} is already compacted")
        if index > self._snapshot.meta.index:
            raise ValueError(f"compact({index}) beyond the snapshot at {self._snapshot.meta.index}")
        placeholder = Entry(index, self.term(index), EntryType.NOOP)
        self._ents = [placeholder, *self._ents[index - offset + 1 :]]
