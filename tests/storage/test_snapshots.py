"""Tests for kmsd.storage.snapshots: atomic save, strict load, retention, tmp cleanup."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError
from kmsd.storage._framing import crc32c
from kmsd.storage.snapshots import MAGIC, Snapshot, SnapshotStore, snapshot_name


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = SnapshotStore.open(tmp_path / "snap")
    assert store.load_latest() is None
    path = store.save(7, 1, b"state at 7")
    assert path == tmp_path / "snap" / "snap-0000000000000007.snap"
    assert path.read_bytes().startswith(MAGIC)
    assert store.load_latest() == Snapshot(7, 1, b"state at 7")
    # A fresh store over the same directory sees it too.
    assert SnapshotStore.open(tmp_path / "snap").load_latest() == Snapshot(7, 1, b"state at 7")


def test_empty_snapshot_data_round_trips(tmp_path: Path) -> None:
    store = SnapshotStore.open(tmp_path)
    store.save(1, 3, b"")
    assert store.load_latest() == Snapshot(1, 3, b"")


def test_keeps_the_newest_two(tmp_path: Path) -> None:
    store = SnapshotStore.open(tmp_path)
    for index in (10, 20, 30, 40):
        store.save(index, 1, b"s%d" % index)
    assert store.indexes() == [30, 40]
    assert store.load_latest() == Snapshot(40, 1, b"s40")
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(30), snapshot_name(40)]


def test_leftover_tmp_is_deleted_on_open(tmp_path: Path) -> None:
    store = SnapshotStore.open(tmp_path)
    store.save(5, 1, b"good")
    leftover = tmp_path / (snapshot_name(9) + ".tmp")
    leftover.write_bytes(b"half a snapshot")
    reopened = SnapshotStore.open(tmp_path)
    assert reopened.removed_tmp == [leftover]
    assert not leftover.exists()
    assert reopened.load_latest() == Snapshot(5, 1, b"good")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-1], "body is"),
        (lambda raw: raw + b"x", "body is"),
        (lambda raw: raw[:10], "shorter than its header"),
        (lambda raw: b"XXXXXXXX" + raw[8:], "bad magic"),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "CRC mismatch"),
    ],
)
def test_damaged_newest_snapshot_is_corruption(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    store = SnapshotStore.open(tmp_path)
    store.save(1, 1, b"older, valid")
    path = store.save(2, 1, b"newest")
    path.write_bytes(damage(path.read_bytes()))
    # Strict: no silent fallback to the older snapshot.
    with pytest.raises(StorageCorruptedError, match=message) as info:
        store.load_latest()
    assert str(path) in str(info.value)
    assert "refusing to start" in str(info.value)


def test_snapshot_under_the_wrong_name_is_corruption(tmp_path: Path) -> None:
    store = SnapshotStore.open(tmp_path)
    path = store.save(3, 1, b"three")
    path.rename(tmp_path / snapshot_name(4))
    with pytest.raises(StorageCorruptedError, match="holds index 3, its name says 4"):
        store.load_latest()


def test_fsync_failure_propagates_and_leaves_no_snapshot(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    store = SnapshotStore.open(tmp_path, fsync=failing)
    with pytest.raises(OSError, match="injected"):
        store.save(1, 1, b"never durable")
    assert store.load_latest() is None
    assert SnapshotStore.open(tmp_path).removed_tmp == [tmp_path / (snapshot_name(1) + ".tmp")]


def test_rejects_index_zero(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SnapshotStore.open(tmp_path).save(0, 1, b"")


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300_000])
def test_a_file_written_in_parts_is_the_one_protobuf_would_write(tmp_path: Path, size: int) -> None:
    """The body is written field by field so the data is never copied; it must be the
    exact bytes of a serialized SnapshotFile, header and checksum included."""
    data = bytes(i % 256 for i in range(size))
    body = wal_pb2.SnapshotFile(index=2**40 + 3, term=9, data=data).SerializeToString()
    expected = struct.pack("<8sQI", MAGIC, len(body), crc32c(body)) + body
    store = SnapshotStore.open(tmp_path)
    assert store.save(2**40 + 3, 9, data).read_bytes() == expected
    assert store.load_latest() == Snapshot(2**40 + 3, 9, data)
