"""The write-ahead log: CRC-framed `kms.raft.v1.WalRecord`s in append-only segment files.

On disk, a WAL is a directory of segments named `wal-<16 lowercase hex>.log`, read
in the order of that number. Each segment is a sequence of records framed as

    uint32-LE length ‖ uint32-LE CRC32C(payload) ‖ payload (a serialized WalRecord)

A segment's number is the index its first entry was expected to have when it was
created (the last index + 1), raised to the previous segment's number + 1 if a Raft
truncation had moved the log back, so numbers strictly increase. Every segment but
the last was fdatasynced before its successor was created, and each new segment
starts with the latest HardState and SnapshotMarker so compaction never loses them.

Recovery (`Wal.open`) reads every segment and enforces:
- only the end of the last segment may be damaged: a short, zero-filled or
  CRC-failing tail is a write torn by a crash, and is cut off (a copy of the cut
  bytes is kept beside the segment as `<segment>.broken`) and reported;
- anything else (a bad CRC followed by a valid record, a damaged earlier segment,
  an unparsable record, a missing segment or a gap in entry indexes) is corruption:
  `StorageCorruptedError`, because continuing with a shorter log would silently
  drop acknowledged writes.

Entries are dense: an entry's index is at most the last index + 1; an index at or
below the last one replaces that entry and all after it (a Raft log truncation).

A `Wal` is not thread-safe: one caller at a time (the log's single I/O thread).
Any OSError poisons it: the caller must fail-stop, never retry (a retried fsync can
report success for data the kernel already dropped).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError, UnavailableError
from kmsd.storage._framing import RECORD_HEADER, crc32c, frame
from kmsd.storage._fsutil import (
    Syncer,
    fsync_dir,
    make_dir,
    unused_path,
    write_all,
    write_durable_file,
)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
"""A segment that has grown past this size is closed and a new one started."""

_SEGMENT_RE = re.compile(r"^wal-([0-9a-f]{16})\.log$")


def segment_name(first_index: int) -> str:
    """The file name of the segment whose number is `first_index`."""
    return f"wal-{first_index:016x}.log"


@dataclass(frozen=True)
class TailRepair:
    """A torn tail cut off the last segment during recovery."""

    segment: Path
    offset: int
    """Where the segment now ends: the end of its last intact record."""
    cut_bytes: int
    broken_copy: Path
    """Where the cut bytes were saved, for forensics."""
    reason: str


@dataclass(frozen=True)
class RecoveredState:
    """What `Wal.open` found on disk.

    `entries` is the effective log (truncations applied), contiguous, and may begin
    before the latest snapshot: entries are only dropped a whole segment at a time.
    """

    entries: list[wal_pb2.Entry]
    hard_state: wal_pb2.HardState | None
    snapshot: wal_pb2.SnapshotMarker | None
    repair: TailRepair | None

    @property
    def repaired(self) -> bool:
        """True when a torn tail was cut off."""
        return self.repair is not None


def _corrupted(path: Path, offset: int, why: str) -> StorageCorruptedError:
    return StorageCorruptedError(
        f"refusing to start: WAL corrupted at {path} offset {offset}: {why}; "
        "restore this node from a backup or re-add it under a new id"
    )


@dataclass
class _Scan:
    records: list[tuple[int, wal_pb2.WalRecord]]
    end: int
    """Offset just past the last intact record."""
    damage: str | None
    """Why reading stopped before the end of the file, if it did."""


def _parse(path: Path, offset: int, payload: bytes) -> wal_pb2.WalRecord:
    # The CRC matched, so these are the bytes we wrote: a parse failure or an unknown
    # record type is not a torn write and must never be skipped.
    try:
        record = wal_pb2.WalRecord.FromString(payload)
    except DecodeError as exc:
        raise _corrupted(path, offset, f"record does not parse ({exc})") from None
    if record.WhichOneof("record") is None:
        raise _corrupted(path, offset, "record of unknown type (written by a newer kmsd?)")
    return record


def _scan(path: Path, data: bytes) -> _Scan:
    records: list[tuple[int, wal_pb2.WalRecord]] = []
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < RECORD_HEADER.size:
            return _Scan(records, offset, "incomplete record header")
        length, checksum = RECORD_HEADER.unpack_from(data, offset)
        if length == 0:
            # We never write empty records, so a zero header is unwritten (zero-filled) space.
            return _Scan(records, offset, "zero-filled record header")
        start = offset + RECORD_HEADER.size
        if start + length > size:
            return _Scan(records, offset, "record extends past the end of the file")
        payload = data[start : start + length]
        if crc32c(payload) != checksum:
            return _Scan(records, offset, "CRC mismatch")
        records.append((offset, _parse(path, offset, payload)))
        offset = start + length
    return _Scan(records, offset, None)


def _valid_record_after(data: bytes, offset: int) -> int | None:
    """The offset of the first intact record that starts after `offset`, if any.

    A torn write only damages the end of the file; finding a good record beyond the
    damage proves it is not a torn tail (for example a flipped bit in a length).
    """
    # A record's length is never 0, so it cannot start inside the trailing zeros.
    last_nonzero = len(data.rstrip(b"\0")) - 1
    stop = min(last_nonzero, len(data) - RECORD_HEADER.size)
    for candidate in range(offset + 1, stop + 1):
        length, checksum = RECORD_HEADER.unpack_from(data, candidate)
        start = candidate + RECORD_HEADER.size
        if length == 0 or start + length > len(data):
            continue
        payload = data[start : start + length]
        if crc32c(payload) != checksum:
            continue
        try:
            record = wal_pb2.WalRecord.FromString(payload)
        except DecodeError:
            continue
        if record.WhichOneof("record") is not None:
            return candidate
    return None


class _Replay:
    """Folds records, in file order, into the effective log and latest states."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        """The index the next entry may have at most (the last index + 1)."""
        self.entries: list[wal_pb2.Entry] = []
        self.hard_state: wal_pb2.HardState | None = None
        self.snapshot: wal_pb2.SnapshotMarker | None = None

    def add(self, path: Path, offset: int, record: wal_pb2.WalRecord) -> None:
        kind = record.WhichOneof("record")
        if kind == "hard_state":
            self.hard_state = record.hard_state
        elif kind == "snapshot":
            self.snapshot = record.snapshot
            if record.snapshot.replaces_log:
                # An installed snapshot voids the whole log before it.
                self.entries = []
                self.expected = record.snapshot.index + 1
        else:
            index = record.entry.index
            if index == 0 or index > self.expected:
                why = f"entry index {index} does not follow {self.expected - 1}"
                raise _corrupted(path, offset, why)
            if self.entries:
                # An index at or below the last replaces that entry and all after it.
                del self.entries[max(0, index - self.entries[0].index) :]
            self.entries.append(record.entry)
            self.expected = index + 1


def _repair_tail(path: Path, data: bytes, offset: int, reason: str, syncer: Syncer) -> TailRepair:
    # Same order as etcd's wal.Repair: keep the evidence durably, then cut.
    broken = unused_path(path.with_name(path.name + ".broken"))
    write_durable_file(broken, [data[offset:]], os.fsync)
    fsync_dir(path.parent)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        syncer(fd)
    finally:
        os.close(fd)
    return TailRepair(path, offset, len(data) - offset, broken, reason)


class Wal:
    """An open write-ahead log; see the module docstring for the format and rules."""

    def __init__(
        self,
        directory: Path,
        segments: list[tuple[int, Path]],
        last_index: int,
        hard_state: wal_pb2.HardState | None,
        snapshot: wal_pb2.SnapshotMarker | None,
        *,
        segment_bytes: int,
        datasync: Syncer,
    ) -> None:
        """Use `Wal.open`."""
        self._dir = directory
        self._segments = segments
        self._last_index = last_index
        self._hard_state = hard_state
        self._snapshot = snapshot
        self._segment_bytes = segment_bytes
        self._datasync = datasync
        tail = segments[-1][1]
        self._fd: int | None = os.open(tail, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self._failure: OSError | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        first_index: int = 1,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        datasync: Syncer = os.fdatasync,
    ) -> tuple[Wal, RecoveredState]:
        """Opens (recovering) the WAL in `directory`, creating it if it has no segments.

        `first_index` is the index the first entry of a newly created WAL will have;
        it is ignored when segments exist. `datasync` makes a segment's data durable
        (a seam for tests). Raises StorageCorruptedError; OSError propagates.
        """
        if first_index < 1:
            raise ValueError("first_index must be >= 1")
        make_dir(directory)
        segments = sorted(
            (int(m.group(1), 16), directory / name)
            for name in os.listdir(directory)
            if (m := _SEGMENT_RE.match(name))
        )
        if not segments:
            path = directory / segment_name(first_index)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            fsync_dir(directory)
            segments = [(first_index, path)]
        replay = _Replay(segments[0][0])
        repair: TailRepair | None = None
        for position, (number, path) in enumerate(segments):
            if position > 0:
                wanted = max(replay.expected, segments[position - 1][0] + 1)
                if number != wanted:
                    why = f"segment number {number} should be {wanted} (a segment is missing)"
                    raise _corrupted(path, 0, why)
            data = path.read_bytes()
            scan = _scan(path, data)
            if scan.damage is not None:
                if position != len(segments) - 1:
                    raise _corrupted(path, scan.end, scan.damage + " in a sealed segment")
                later = _valid_record_after(data, scan.end)
                if later is not None:
                    why = f"{scan.damage}, but an intact record follows at offset {later}"
                    raise _corrupted(path, scan.end, why)
                repair = _repair_tail(path, data, scan.end, scan.damage, datasync)
            for offset, record in scan.records:
                replay.add(path, offset, record)
        wal = cls(
            directory,
            segments,
            replay.expected - 1,
            replay.hard_state,
            replay.snapshot,
            segment_bytes=segment_bytes,
            datasync=datasync,
        )
        return wal, RecoveredState(replay.entries, replay.hard_state, replay.snapshot, repair)

    @property
    def last_index(self) -> int:
        """The index of the last entry appended (the first segment's number - 1 if none)."""
        return self._last_index

    @property
    def segment_paths(self) -> list[Path]:
        """The segment files, oldest first."""
        return [path for _, path in self._segments]

    def append(self, records: Sequence[wal_pb2.WalRecord]) -> None:
        """Writes `records` to the OS (not durable until `sync`). May start a new segment.

        Raises ValueError, before writing anything, for a record with nothing set or
        an entry whose index would leave a gap.
        """
        fd = self._usable_fd()
        encoded = bytearray()
        last_index = self._last_index
        hard_state, snapshot = self._hard_state, self._snapshot
        for record in records:
            kind = record.WhichOneof("record")
            if kind == "entry":
                index = record.entry.index
                if not 1 <= index <= last_index + 1:
                    raise ValueError(f"entry index {index} does not follow {last_index}")
                last_index = index
            elif kind == "hard_state":
                # Copies: the caller may reuse its messages after we return.
                hard_state = wal_pb2.HardState()
                hard_state.CopyFrom(record.hard_state)
            elif kind == "snapshot":
                snapshot = wal_pb2.SnapshotMarker()
                snapshot.CopyFrom(record.snapshot)
                if snapshot.replaces_log:
                    last_index = snapshot.index
            else:
                raise ValueError("WalRecord has no record set")
            encoded += frame(record.SerializeToString())
        if not encoded:
            return
        try:
            if self._size >= self._segment_bytes:
                fd = self._cut()
            write_all(fd, encoded)
        except OSError as exc:
            self._failure = exc
            raise
        self._size += len(encoded)
        self._last_index = last_index
        self._hard_state, self._snapshot = hard_state, snapshot

    def sync(self) -> None:
        """Makes everything appended durable (fdatasync). Blocks; run it off the event loop."""
        fd = self._usable_fd()
        try:
            self._datasync(fd)
        except OSError as exc:
            self._failure = exc
            raise

    def compact(self, upto_index: int) -> list[Path]:
        """Deletes the oldest segments holding only entries <= `upto_index`; returns them.

        Call only once a snapshot covering `upto_index` is durable. The last segment
        is never deleted.
        """
        self._usable_fd()
        removed: list[Path] = []
        try:
            # Oldest first, so a crash part-way leaves a contiguous run of segments.
            while len(self._segments) > 1 and self._segments[1][0] - 1 <= upto_index:
                path = self._segments[0][1]
                os.unlink(path)
                self._segments.pop(0)
                removed.append(path)
            if removed:
                fsync_dir(self._dir)
        except OSError as exc:
            self._failure = exc
            raise
        return removed

    def close(self) -> None:
        """Closes the segment file; idempotent. Unsynced appends may be lost."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _usable_fd(self) -> int:
        if self._failure is not None:
            raise UnavailableError(f"WAL failed earlier: {self._failure}")
        if self._fd is None:
            raise UnavailableError("WAL is closed")
        return self._fd

    def _cut(self) -> int:
        assert self._fd is not None
        # Seal the full segment first: only the last segment may ever have a torn tail.
        self._datasync(self._fd)
        os.close(self._fd)
        self._fd = None
        number = max(self._last_index + 1, self._segments[-1][0] + 1)
        path = self._dir / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._fd = fd
        self._segments.append((number, path))
        self._size = 0
        # The directory entry must be durable before any data we later ack lives in it.
        fsync_dir(self._dir)
        carried = bytearray()
        if self._hard_state is not None:
            carried += frame(wal_pb2.WalRecord(hard_state=self._hard_state).SerializeToString())
        if self._snapshot is not None:
            # Carried only as a reminder of the snapshot: it must not void the entries
            # that earlier segments hold after an installed snapshot.
            marker = wal_pb2.SnapshotMarker(index=self._snapshot.index, term=self._snapshot.term)
            carried += frame(wal_pb2.WalRecord(snapshot=marker).SerializeToString())
        if carried:
            write_all(fd, carried)
            self._size = len(carried)
        return fd
