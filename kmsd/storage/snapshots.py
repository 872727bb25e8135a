"""Snapshot files: the state machine's serialization at a log index, written atomically.

On disk, a directory of `snap-<16 lowercase hex index>.snap` files, each

    magic b"KMSSNP\\x00\\x01" ‖ uint64-LE body length ‖ uint32-LE CRC32C(body) ‖ body

where the body is a serialized `kms.raft.v1.SnapshotFile` whose index matches the
file name. A file is written as `<name>.tmp`, fsynced, renamed into place and the
directory fsynced, so a `.snap` file is always complete; a leftover `.tmp` is an
interrupted save and is deleted on open. The newest two snapshots are kept.

Loading is strict: a newest snapshot that fails its checks is corruption
(`StorageCorruptedError`), never a reason to fall back silently to an older one,
because the WAL before the newest snapshot may already have been compacted away.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError
from kmsd.protowire import bytes_field_head
from kmsd.storage._framing import crc32c
from kmsd.storage._fsutil import Syncer, fsync_dir, make_dir, write_durable_file

MAGIC = b"KMSSNP\x00\x01"
"""Identifies a kmsd snapshot file; the last two bytes are the framing version."""

_HEADER = struct.Struct("<8sQI")
_SNAP_RE = re.compile(r"^snap-([0-9a-f]{16})\.snap$")
_TMP_SUFFIX = ".tmp"
KEEP = 2
"""How many snapshots `save` leaves on disk."""


def snapshot_name(index: int) -> str:
    """The file name of the snapshot at `index`."""
    return f"snap-{index:016x}.snap"


@dataclass(frozen=True)
class Snapshot:
    """A loaded snapshot. `data` is the state machine's serialization; never log it."""

    index: int
    term: int
    data: bytes


def _corrupted(path: Path, why: str) -> StorageCorruptedError:
    return StorageCorruptedError(
        f"refusing to start: snapshot {path} is corrupted: {why}; "
        "restore this node from a backup or re-add it under a new id"
    )


def encode_snapshot(index: int, term: int, data: bytes) -> list[bytes]:
    """The complete contents of a snapshot file, in parts that refer to `data` rather
    than copy it (a snapshot may be tens of MB): header, then the body, a
    `SnapshotFile` written field by field (`data` is its last field)."""
    head = wal_pb2.SnapshotFile(index=index, term=term).SerializeToString()
    if data:
        head += bytes_field_head(wal_pb2.SnapshotFile.DATA_FIELD_NUMBER, len(data))
    checksum = crc32c(head, data)
    return [_HEADER.pack(MAGIC, len(head) + len(data), checksum), head, data]


def decode_snapshot(path: Path, raw: bytes) -> Snapshot:
    """Checks and parses a snapshot file's contents; raises StorageCorruptedError."""
    if len(raw) < _HEADER.size:
        raise _corrupted(path, f"file is {len(raw)} bytes, shorter than its header")
    magic, length, checksum = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise _corrupted(path, "bad magic (not a kmsd snapshot, or an unknown version)")
    body = raw[_HEADER.size :]
    if len(body) != length:
        raise _corrupted(path, f"body is {len(body)} bytes, header says {length}")
    if crc32c(body) != checksum:
        raise _corrupted(path, "CRC mismatch")
    try:
        parsed = wal_pb2.SnapshotFile.FromString(body)
    except DecodeError as exc:
        raise _corrupted(path, f"body does not parse ({exc})") from None
    return Snapshot(parsed.index, parsed.term, parsed.data)


class SnapshotStore:
    """The snapshot files of one node. Not thread-safe: one caller at a time."""

    def __init__(self, directory: Path, fsync: Syncer, removed_tmp: list[Path]) -> None:
        """Use `SnapshotStore.open`."""
        self._dir = directory
        self._fsync = fsync
        self.removed_tmp = removed_tmp
        """Interrupted saves deleted by `open`."""

    @classmethod
    def open(cls, directory: Path, *, fsync: Syncer = os.fsync) -> SnapshotStore:
        """Opens (creating) the store and deletes leftover `.tmp` files.

        `fsync` makes a file durable (a seam for tests). OSError propagates.
        """
        make_dir(directory)
        removed: list[Path] = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(_TMP_SUFFIX):
                (directory / name).unlink()
                removed.append(directory / name)
        if removed:
            fsync_dir(directory)
        return cls(directory, fsync, removed)

    def indexes(self) -> list[int]:
        """The indexes of the snapshots on disk, oldest first."""
        return sorted(
            int(m.group(1), 16) for name in os.listdir(self._dir) if (m := _SNAP_RE.match(name))
        )

    def save(self, index: int, term: int, data: bytes) -> Path:
        """Durably writes the snapshot at `index`, then deletes all but the newest KEEP.

        Blocks on fsync: run it off the event loop. OSError propagates (the caller
        must treat it as fatal).
        """
        if index < 1:
            raise ValueError("snapshot index must be >= 1")
        final = self._dir / snapshot_name(index)
        tmp = final.with_name(final.name + _TMP_SUFFIX)
        write_durable_file(tmp, encode_snapshot(index, term, data), self._fsync)
        os.replace(tmp, final)
        fsync_dir(self._dir)
        stale = self.indexes()[:-KEEP]
        for old in stale:
            (self._dir / snapshot_name(old)).unlink()
        if stale:
            fsync_dir(self._dir)
        return final

    def load_latest(self) -> Snapshot | None:
        """The newest snapshot, or None if there is none. Raises StorageCorruptedError."""
        indexes = self.indexes()
        if not indexes:
            return None
        path = self._dir / snapshot_name(indexes[-1])
        snapshot = decode_snapshot(path, path.read_bytes())
        if snapshot.index != indexes[-1]:
            raise _corrupted(path, f"holds index {snapshot.index}, its name says {indexes[-1]}")
        return snapshot
