"""Tests for kmsd.storage.wal: round trips, torn-tail repair, corruption, rollover, compaction."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError, UnavailableError
from kmsd.storage._framing import RECORD_HEADER, crc32c, frame
from kmsd.storage.wal import Wal, segment_name


def entry(index: int, data: bytes | None = None, term: int = 1) -> wal_pb2.WalRecord:
    payload = data if data is not None else b"command-%d" % index
    return wal_pb2.WalRecord(
        entry=wal_pb2.Entry(index=index, term=term, type=wal_pb2.ENTRY_TYPE_NORMAL, data=payload)
    )


def hard_state(term: int, vote: int, commit: int) -> wal_pb2.WalRecord:
    return wal_pb2.WalRecord(hard_state=wal_pb2.HardState(term=term, vote=vote, commit=commit))


def marker(index: int, term: int = 1) -> wal_pb2.WalRecord:
    return wal_pb2.WalRecord(snapshot=wal_pb2.SnapshotMarker(index=index, term=term))


def indexes(entries: Sequence[wal_pb2.Entry]) -> list[int]:
    return [e.index for e in entries]


def first_entry_index(segment: Path) -> int:
    data = segment.read_bytes()
    offset = 0
    while offset < len(data):
        length, _ = RECORD_HEADER.unpack_from(data, offset)
        start = offset + RECORD_HEADER.size
        record = wal_pb2.WalRecord.FromString(data[start : start + length])
        if record.WhichOneof("record") == "entry":
            return record.entry.index
        offset = start + length
    raise AssertionError(f"no entry in {segment}")


def write_entries(directory: Path, count: int) -> tuple[Path, list[int]]:
    """Writes entries 1..count, one append each; returns the last segment and the
    offset each record of it starts at, plus its end."""
    wal, _ = Wal.open(directory)
    for i in range(1, count + 1):
        wal.append([entry(i)])
    wal.sync()
    last = wal.segment_paths[-1]
    wal.close()
    data = last.read_bytes()
    offsets = [0]
    while offsets[-1] < len(data):
        length, _ = RECORD_HEADER.unpack_from(data, offsets[-1])
        offsets.append(offsets[-1] + RECORD_HEADER.size + length)
    return last, offsets


def test_round_trip_across_reopen(tmp_path: Path) -> None:
    wal, recovered = Wal.open(tmp_path / "wal")
    assert recovered.entries == [] and not recovered.repaired
    assert wal.last_index == 0
    wal.append([entry(1), entry(2), hard_state(1, 1, 2)])
    wal.append([entry(3), marker(2)])
    wal.sync()
    wal.close()

    wal, recovered = Wal.open(tmp_path / "wal")
    assert indexes(recovered.entries) == [1, 2, 3]
    assert [e.data for e in recovered.entries] == [b"command-1", b"command-2", b"command-3"]
    assert recovered.hard_state == wal_pb2.HardState(term=1, vote=1, commit=2)
    assert recovered.snapshot == wal_pb2.SnapshotMarker(index=2, term=1)
    assert not recovered.repaired
    assert wal.last_index == 3
    wal.append([entry(4)])
    wal.sync()
    wal.close()

    _, recovered = Wal.open(tmp_path / "wal")
    assert indexes(recovered.entries) == [1, 2, 3, 4]


def test_new_wal_starts_at_first_index(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, first_index=42)
    assert wal.last_index == 41
    assert wal.segment_paths == [tmp_path / segment_name(42)]
    with pytest.raises(ValueError, match="does not follow"):
        wal.append([entry(44)])
    wal.append([entry(42)])
    wal.close()
    reopened, recovered = Wal.open(tmp_path, first_index=1)  # ignored: segments exist
    assert indexes(recovered.entries) == [42]
    reopened.close()


def test_append_rejects_gaps_and_empty_records_without_writing(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path)
    with pytest.raises(ValueError, match="does not follow"):
        wal.append([entry(1), entry(3)])
    with pytest.raises(ValueError, match="no record set"):
        wal.append([entry(1), wal_pb2.WalRecord()])
    with pytest.raises(ValueError):
        wal.append([entry(0)])
    assert wal.segment_paths[0].stat().st_size == 0
    wal.close()


def test_later_entry_replaces_suffix(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path)
    wal.append([entry(i) for i in range(1, 6)])
    wal.append([entry(3, b"replacement", term=2)])
    assert wal.last_index == 3
    wal.append([entry(4, b"after", term=2)])
    wal.close()
    _, recovered = Wal.open(tmp_path)
    assert indexes(recovered.entries) == [1, 2, 3, 4]
    assert [e.data for e in recovered.entries[2:]] == [b"replacement", b"after"]
    assert [e.term for e in recovered.entries] == [1, 1, 2, 2]


def test_torn_tail_at_every_offset_of_last_record(tmp_path: Path) -> None:
    original = tmp_path / "original"
    last, offsets = write_entries(original, 5)
    data = last.read_bytes()
    start, end = offsets[-2], offsets[-1]
    for cut in range(start, end):
        trial = tmp_path / f"cut-{cut}"
        shutil.copytree(original, trial)
        segment = trial / last.name
        os.truncate(segment, cut)

        wal, recovered = Wal.open(trial)
        assert indexes(recovered.entries) == [1, 2, 3, 4], cut
        if cut == start:
            assert recovered.repair is None
        else:
            repair = recovered.repair
            assert repair is not None
            assert (repair.segment, repair.offset) == (segment, start)
            assert repair.cut_bytes == cut - start
            assert repair.broken_copy == trial / (last.name + ".broken")
            assert repair.broken_copy.read_bytes() == data[start:cut]
        assert segment.stat().st_size == start
        # The log continues cleanly where the intact records end.
        assert wal.last_index == 4
        wal.append([entry(5)])
        wal.sync()
        wal.close()
        _, again = Wal.open(trial)
        assert indexes(again.entries) == [1, 2, 3, 4, 5]
        assert again.repair is None


def test_damaged_bytes_in_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    original = tmp_path / "original"
    last, offsets = write_entries(original, 4)
    start, end = offsets[-2], offsets[-1]
    for position in range(start, end):
        trial = tmp_path / f"flip-{position}"
        shutil.copytree(original, trial)
        segment = trial / last.name
        data = bytearray(segment.read_bytes())
        data[position] ^= 0x40
        segment.write_bytes(bytes(data))

        wal, recovered = Wal.open(trial)
        wal.close()
        assert indexes(recovered.entries) == [1, 2, 3], position
        assert recovered.repair is not None
        assert recovered.repair.offset == start
        assert segment.stat().st_size == start


def test_zero_filled_tail_is_cut(tmp_path: Path) -> None:
    last, offsets = write_entries(tmp_path, 3)
    with open(last, "ab") as f:
        f.write(b"\0" * 4096)
    wal, recovered = Wal.open(tmp_path)
    wal.close()
    assert indexes(recovered.entries) == [1, 2, 3]
    assert recovered.repair is not None
    assert (recovered.repair.offset, recovered.repair.cut_bytes) == (offsets[-1], 4096)
    assert recovered.repair.reason == "zero-filled record header"


def test_second_repair_keeps_the_first_broken_copy(tmp_path: Path) -> None:
    last, _ = write_entries(tmp_path, 2)
    with open(last, "ab") as f:
        f.write(b"\x01garbage")
    Wal.open(tmp_path)[0].close()
    with open(last, "ab") as f:
        f.write(b"\x02more")
    wal, recovered = Wal.open(tmp_path)
    wal.close()
    assert recovered.repair is not None
    assert recovered.repair.broken_copy == tmp_path / (last.name + ".broken.1")
    assert (tmp_path / (last.name + ".broken")).read_bytes() == b"\x01garbage"


def test_bad_crc_in_middle_record_is_corruption(tmp_path: Path) -> None:
    last, offsets = write_entries(tmp_path, 5)
    data = bytearray(last.read_bytes())
    data[offsets[2] + RECORD_HEADER.size + 1] ^= 0x01  # payload of the third record
    last.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptedError) as info:
        Wal.open(tmp_path)
    message = str(info.value)
    assert str(last) in message
    assert f"offset {offsets[2]}" in message
    assert "CRC mismatch" in message
    assert "refusing to start" in message
    assert "re-add it under a new id" in message
    assert last.read_bytes() == bytes(data)  # nothing was cut


def test_bad_length_in_middle_record_is_corruption(tmp_path: Path) -> None:
    # A flipped high bit in a length makes the record seem to run past the end of the
    # file, like a torn write; the intact records after it prove otherwise.
    last, offsets = write_entries(tmp_path, 5)
    data = bytearray(last.read_bytes())
    data[offsets[1] + 3] ^= 0x10
    last.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptedError, match=f"offset {offsets[1]}.*intact record"):
        Wal.open(tmp_path)


def test_damage_in_sealed_segment_is_corruption(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, segment_bytes=100)
    for i in range(1, 11):
        wal.append([entry(i)])
    segments = wal.segment_paths
    wal.close()
    assert len(segments) >= 3
    sealed = segments[0]
    size = sealed.stat().st_size
    os.truncate(sealed, size - 1)
    with pytest.raises(StorageCorruptedError, match=f"{sealed}.*sealed segment"):
        Wal.open(tmp_path)


def test_parse_failure_with_good_crc_is_corruption(tmp_path: Path) -> None:
    last, offsets = write_entries(tmp_path, 2)
    with open(last, "ab") as f:
        f.write(frame(b"\xff\xff\xff"))
    with pytest.raises(StorageCorruptedError, match=f"offset {offsets[-1]}.*does not parse"):
        Wal.open(tmp_path)


def test_unknown_record_type_is_corruption(tmp_path: Path) -> None:
    last, offsets = write_entries(tmp_path, 2)
    unknown_field_9 = b"\x4a\x02\x08\x01"  # field 9, length-delimited: a future record type
    with open(last, "ab") as f:
        f.write(frame(unknown_field_9))
    with pytest.raises(StorageCorruptedError, match=f"offset {offsets[-1]}.*unknown type"):
        Wal.open(tmp_path)


def test_index_gap_is_corruption(tmp_path: Path) -> None:
    segment = tmp_path / segment_name(1)
    records = [entry(1), entry(2), entry(4)]
    encoded = [frame(r.SerializeToString()) for r in records]
    segment.write_bytes(b"".join(encoded))
    gap_offset = len(encoded[0]) + len(encoded[1])
    with pytest.raises(StorageCorruptedError, match=f"offset {gap_offset}.*index 4"):
        Wal.open(tmp_path)


def test_first_entry_must_match_segment_number(tmp_path: Path) -> None:
    (tmp_path / segment_name(1)).write_bytes(frame(entry(2).SerializeToString()))
    with pytest.raises(StorageCorruptedError, match="entry index 2 does not follow 0"):
        Wal.open(tmp_path)


def test_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, segment_bytes=100)
    for i in range(1, 11):
        wal.append([entry(i)])
    segments = wal.segment_paths
    wal.close()
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(StorageCorruptedError, match="a segment is missing"):
        Wal.open(tmp_path)


def test_rollover_and_compaction(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, segment_bytes=120)
    wal.append([hard_state(1, 1, 0)])
    for i in range(1, 31):
        wal.append([entry(i)])
        if i == 5:
            wal.append([marker(5)])
    wal.sync()
    segments = wal.segment_paths
    assert len(segments) >= 5
    numbers = [int(p.name[4:20], 16) for p in segments]
    assert numbers == sorted(numbers) and numbers[0] == 1
    for path in segments[:-1]:
        # A segment is only ever closed once it is full.
        assert path.stat().st_size >= 120

    wal.close()
    for number, path in zip(numbers, segments, strict=True):
        # A segment's number is the index of the first entry written into it.
        assert first_entry_index(path) == number
    _, recovered = Wal.open(tmp_path, segment_bytes=120)
    assert indexes(recovered.entries) == list(range(1, 31))
    wal, _ = Wal.open(tmp_path, segment_bytes=120)

    removed = wal.compact(numbers[3] - 1)
    assert removed == segments[:3]
    assert wal.segment_paths == segments[3:]
    assert not any(p.exists() for p in removed)
    assert wal.compact(numbers[3] - 1) == []
    # The last segment is never removed, whatever the index.
    wal.compact(10_000)
    assert wal.segment_paths == segments[-1:]
    wal.append([entry(31)])
    wal.sync()
    wal.close()

    _, recovered = Wal.open(tmp_path, segment_bytes=120)
    assert recovered.entries[-1].index == 31
    assert indexes(recovered.entries) == list(range(numbers[-1], 32))
    # Carried into every new segment, so compaction never loses them.
    assert recovered.hard_state == wal_pb2.HardState(term=1, vote=1, commit=0)
    assert recovered.snapshot == wal_pb2.SnapshotMarker(index=5, term=1)


def test_compaction_keeps_segments_with_needed_entries(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, segment_bytes=100)
    for i in range(1, 21):
        wal.append([entry(i)])
    segments = wal.segment_paths
    numbers = [int(p.name[4:20], 16) for p in segments]
    # Upto one less than the second segment's last entry: the first segment goes,
    # the second stays.
    removed = wal.compact(numbers[2] - 2)
    assert removed == segments[:1]
    wal.close()
    _, recovered = Wal.open(tmp_path)
    assert recovered.entries[0].index == numbers[1]
    assert recovered.entries[-1].index == 20


def test_truncation_below_current_segment_keeps_names_increasing(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path, segment_bytes=100)
    for i in range(1, 11):
        wal.append([entry(i)])
    before = wal.segment_paths
    # A Raft truncation back into an earlier segment, then enough to roll over.
    wal.append([entry(2, b"new-2", term=2)])
    for i in range(3, 8):
        wal.append([entry(i, b"new-%d" % i, term=2)])
    after = wal.segment_paths
    assert len(after) > len(before)
    numbers = [int(p.name[4:20], 16) for p in after]
    assert numbers == sorted(set(numbers))
    wal.close()
    _, recovered = Wal.open(tmp_path)
    assert indexes(recovered.entries) == list(range(1, 8))
    assert [e.term for e in recovered.entries] == [1] + [2] * 6


def test_sync_uses_injected_syncer(tmp_path: Path) -> None:
    synced: list[int] = []
    wal, _ = Wal.open(tmp_path, datasync=synced.append)
    wal.append([entry(1), entry(2)])
    assert synced == []
    wal.sync()
    assert len(synced) == 1
    wal.close()


def test_sync_failure_poisons_the_wal(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    wal, _ = Wal.open(tmp_path, datasync=failing)
    wal.append([entry(1)])
    with pytest.raises(OSError, match="injected"):
        wal.sync()
    # Never retry: a second fsync may "succeed" for pages the kernel already dropped.
    with pytest.raises(UnavailableError, match="failed earlier"):
        wal.sync()
    with pytest.raises(UnavailableError):
        wal.append([entry(2)])
    wal.close()
    with pytest.raises(UnavailableError):
        wal.append([entry(2)])


def test_closed_wal_refuses_writes(tmp_path: Path) -> None:
    wal, _ = Wal.open(tmp_path)
    wal.close()
    wal.close()
    with pytest.raises(UnavailableError, match="closed"):
        wal.append([entry(1)])


def test_crc32c_is_castagnoli() -> None:
    # RFC 3720 B.4 test vector: 32 bytes of zeros.
    assert crc32c(b"\0" * 32) == 0x8A9136AA
