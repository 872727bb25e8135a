"""Durable local storage: the write-ahead log and the snapshot files.

`wal` owns the segment files of CRC-framed `kms.raft.v1.WalRecord`s and their
crash recovery; `snapshots` owns the atomically written snapshot files. Both raise
`StorageCorruptedError` for damage that is not a torn write, and let OSError
propagate so the caller can fail-stop.
"""

from kmsd.storage.snapshots import Snapshot, SnapshotStore
from kmsd.storage.wal import DEFAULT_SEGMENT_BYTES, RecoveredState, TailRepair, Wal

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "RecoveredState",
    "Snapshot",
    "SnapshotStore",
    "TailRepair",
    "Wal",
]
