"""A Raft node's durable state: WAL (entries, HardState, snapshot markers) and snapshot
files, recovered on start into the `MemoryStorage` the Raft core reads.

Write methods block on fsync. The driver calls them one at a time (on its I/O thread
while it leads, inline otherwise: never two at once), and mirrors what they made
durable into the MemoryStorage only afterwards, so the core never sees anything that
is not on disk. The one exception is `write_snapshot`, which the driver's snapshot
thread runs meanwhile: it touches only the snapshot files, under a lock that
`persist` takes too when it installs a leader's snapshot.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError
from kmsd.protowire import bytes_field_head
from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Snapshot,
    SnapshotMeta,
)
from kmsd.storage.snapshots import SnapshotStore
from kmsd.storage.wal import Wal
from kmsd.transport.codec import (
    conf_from_proto,
    conf_to_proto,
    entry_from_proto,
    entry_to_proto,
    hard_state_from_proto,
    hard_state_to_proto,
)

Syncer = Callable[[int], None]


@dataclass(frozen=True)
class Member:
    """A cluster member: its node id and where to reach it."""

    id: int
    peer_address: str
    client_address: str

    def encode(self) -> bytes:
        return wal_pb2.Member(
            id=self.id, peer_address=self.peer_address, client_address=self.client_address
        ).SerializeToString()

    @classmethod
    def from_proto(cls, proto: wal_pb2.Member) -> Member:
        return cls(proto.id, proto.peer_address, proto.client_address)

    @classmethod
    def decode(cls, data: bytes) -> Member:
        return cls.from_proto(wal_pb2.Member.FromString(data))


CLUSTER_STATE_FIELD = wal_pb2.ClusterSnapshot.STATE_FIELD_NUMBER


def cluster_snapshot(state: Sequence[bytes], conf: ConfState, members: Sequence[Member]) -> bytes:
    """A serialized `ClusterSnapshot` of the state machine's snapshot, given as chunks, at
    `conf` with `members` (sorted by id): the protobuf library's bytes, joined once
    (state is field 1, so it comes first)."""
    length = sum(map(len, state))
    head = [bytes_field_head(CLUSTER_STATE_FIELD, length)] if length else []
    rest = wal_pb2.ClusterSnapshot(
        conf=conf_to_proto(conf),
        members=[
            wal_pb2.Member(id=m.id, peer_address=m.peer_address, client_address=m.client_address)
            for m in sorted(members, key=lambda m: m.id)
        ],
    ).SerializeToString()
    return b"".join([*head, *state, rest])


def founding_log(founders: Sequence[Member]) -> tuple[list[Entry], HardState]:
    """The log every founding member starts with: one committed ADD_VOTER entry per
    founder at term 1, in id order, carrying its addresses. Identical on every founder."""
    ordered = sorted(founders, key=lambda m: m.id)
    entries = [
        Entry(
            index,
            1,
            EntryType.CONF_CHANGE,
            ConfChange(ConfChangeType.ADD_VOTER, member.id, member.encode()).encode(),
        )
        for index, member in enumerate(ordered, start=1)
    ]
    return entries, HardState(term=1, vote=0, commit=len(entries))


class RaftDisk:
    """WAL + snapshots of one node; see the module docstring."""

    def __init__(
        self, directory: Path, *, datasync: Syncer = os.fdatasync, fsync: Syncer = os.fsync
    ) -> None:
        self._dir = directory
        self._datasync = datasync
        self._fsync = fsync
        self._wal: Wal | None = None
        self._snaps: SnapshotStore | None = None
        self._snaps_lock = threading.Lock()
        self.tail_repair: object | None = None

    def open(self) -> tuple[MemoryStorage, bool]:
        """Recovers the log; returns its in-memory mirror and whether the disk was empty."""
        self._snaps = SnapshotStore.open(self._dir / "snap", fsync=self._fsync)
        latest = self._snaps.load_latest()
        self._wal, state = Wal.open(self._dir / "wal", datasync=self._datasync)
        self.tail_repair = state.repair
        storage = MemoryStorage()
        base = 0
        if latest is not None:
            cluster = wal_pb2.ClusterSnapshot.FromString(latest.data)
            meta = SnapshotMeta(latest.index, latest.term, conf_from_proto(cluster.conf))
            storage.apply_snapshot(Snapshot(meta, latest.data))
            base = latest.index
        if state.snapshot is not None and state.snapshot.index > base:
            raise StorageCorruptedError(
                f"refusing to start: the WAL names snapshot {state.snapshot.index} but the newest"
                f" snapshot file is {base}; restore this node from a backup"
            )
        entries = [entry_from_proto(e) for e in state.entries if e.index > base]
        if entries and entries[0].index != base + 1:
            raise StorageCorruptedError(
                f"refusing to start: entries {base + 1}..{entries[0].index - 1} are missing"
                " between the snapshot and the WAL; restore this node from a backup"
            )
        storage.append(entries)
        if state.hard_state is not None:
            storage.set_hard_state(hard_state_from_proto(state.hard_state))
        fresh = latest is None and not entries and state.hard_state is None
        return storage, fresh

    def persist(
        self,
        snapshot: Snapshot | None,
        entries: Sequence[Entry],
        hard_state: HardState | None,
        sync: bool,
    ) -> None:
        """Makes one Ready's output durable: an installed snapshot (file, then a marker
        that voids the old log), then entries, then the HardState."""
        assert self._wal is not None and self._snaps is not None
        records: list[wal_pb2.WalRecord] = []
        if snapshot is not None:
            with self._snaps_lock:
                self._snaps.save(snapshot.meta.index, snapshot.meta.term, snapshot.data)
            marker = wal_pb2.SnapshotMarker(
                index=snapshot.meta.index, term=snapshot.meta.term, replaces_log=True
            )
            records.append(wal_pb2.WalRecord(snapshot=marker))
        records.extend(wal_pb2.WalRecord(entry=entry_to_proto(e)) for e in entries)
        if hard_state is not None:
            records.append(wal_pb2.WalRecord(hard_state=hard_state_to_proto(hard_state)))
        if records:
            self._wal.append(records)
        if sync or snapshot is not None:
            self._wal.sync()

    def write_snapshot(self, index: int, term: int, data: bytes) -> None:
        """Durably writes the file of this node's own snapshot at applied `index`. Safe
        while another thread runs `persist`; `mark_snapshot` records it afterwards."""
        assert self._snaps is not None
        with self._snaps_lock:
            self._snaps.save(index, term, data)

    def mark_snapshot(self, index: int, term: int) -> None:
        """Notes in the WAL that the snapshot file at `index` is durable (compaction up to
        it may follow)."""
        assert self._wal is not None
        self._wal.append(
            [wal_pb2.WalRecord(snapshot=wal_pb2.SnapshotMarker(index=index, term=term))]
        )
        self._wal.sync()

    def compact(self, upto_index: int) -> None:
        """Drops WAL segments wholly covered by a durable snapshot."""
        assert self._wal is not None
        self._wal.compact(upto_index)

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
