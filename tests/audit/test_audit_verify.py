"""Offline verification (`kmsctl audit verify`): an intact chain passes; every kind of
tampering is found and the first broken record is named."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import pytest

from kms_client import cli
from kms_client.audit_cli import run_verify
from kms_client.audit_verify import GENESIS, audit_files, canonical, record_hash, verify
from kmsd.audit.record import AuditEvent
from kmsd.audit.writer import AuditWriter
from kmsd.clock import FakeClock


def make_log(directory: Path, count: int = 30, max_file_bytes: int = 1 << 30) -> list[Path]:
    async def main() -> None:
        clock = FakeClock()
        writer = AuditWriter(directory, 3, clock=clock, max_file_bytes=max_file_bytes)
        await writer.start()
        for n in range(count):
            clock.advance(seconds=0.25)
            await writer.record(
                AuditEvent(
                    operation="Decrypt" if n % 3 else "Encrypt",
                    outcome="error" if n % 5 == 4 else "ok",
                    source=f"ipv4:10.0.0.{n}:5000",
                    key_arn=f"arn:aws:kms:us-east-1:111122223333:key/{n:08d}-0000-0000-0000-000000000000",
                    request_id=f"req-{n}",
                    encryption_context={"tenant": f"t{n % 4}", "ünïcode": "✓"},
                )
            )
        await writer.stop()

    asyncio.run(main())
    return audit_files(directory)


@pytest.fixture
def one_file(tmp_path: Path) -> Path:
    files = make_log(tmp_path / "one")
    assert len(files) == 1
    return files[0]


@pytest.fixture
def three_files(tmp_path: Path) -> list[Path]:
    files = make_log(tmp_path / "three", count=30, max_file_bytes=4000)
    assert len(files) >= 3
    return files


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_an_intact_log_verifies(one_file: Path, three_files: list[Path]) -> None:
    result = verify([one_file])
    assert result.ok and result.records == 30 and result.first_bad is None
    assert result.from_genesis and result.first_seq == 1 and result.last_seq == 30
    result = verify(three_files)
    assert result.ok and result.records == 30 and result.files == len(three_files)
    # Given out of order, or as their directory, files are taken in seq order.
    assert verify(list(reversed(three_files))).ok
    assert verify([three_files[0].parent]).records == 30


def test_deleting_a_record_in_the_middle_of_a_file_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    del lines[14]  # seq 15
    one_file.write_bytes(b"".join(lines))
    result = verify([one_file])
    assert not result.ok and result.first_bad is not None
    assert (result.first_bad.line, result.first_bad.seq) == (15, 16)
    assert "record 15 is missing" in result.first_bad.why
    assert result.records == 14


def test_editing_one_byte_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    line = bytearray(lines[9])
    position = line.index(b"t1")  # the tenant value: a plausible edit that stays valid JSON
    line[position + 1] = ord("2")
    lines[9] = bytes(line)
    one_file.write_bytes(b"".join(lines))
    bad = verify([one_file]).first_bad
    assert bad is not None and (bad.line, bad.seq) == (10, 10)
    assert "hash does not match" in bad.why


def test_editing_any_single_byte_of_a_record_is_detected(tmp_path: Path, one_file: Path) -> None:
    original = one_file.read_bytes()
    lines = lines_of(one_file)
    start = sum(len(x) for x in lines[:20])
    for offset in range(start, start + len(lines[20])):
        for replacement in (original[offset] ^ 0x01, ord("0") if original[offset] != 48 else 49):
            tampered = bytearray(original)
            tampered[offset] = replacement
            one_file.write_bytes(bytes(tampered))
            result = verify([one_file])
            assert not result.ok, f"byte {offset - start} of line 21 changed undetected"
            assert result.first_bad is not None and result.first_bad.line in (21, 22)
    one_file.write_bytes(original)
    assert verify([one_file]).ok


def test_a_rewritten_record_with_a_recomputed_hash_breaks_the_next_link(one_file: Path) -> None:
    lines = lines_of(one_file)
    record = json.loads(lines[9])
    record["outcome"] = "ok" if record["outcome"] == "error" else "error"
    record["hash"] = record_hash(record)
    lines[9] = canonical(record) + b"\n"
    one_file.write_bytes(b"".join(lines))
    bad = verify([one_file]).first_bad
    assert bad is not None and (bad.line, bad.seq) == (11, 11)
    assert "prev does not match the hash of record 10" in bad.why


def test_swapping_two_lines_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    lines[7], lines[8] = lines[8], lines[7]
    one_file.write_bytes(b"".join(lines))
    bad = verify([one_file]).first_bad
    assert bad is not None and bad.line == 8 and bad.seq == 9
    assert "seq 9 follows seq 7" in bad.why


def test_a_repeated_record_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    lines.insert(5, lines[4])
    one_file.write_bytes(b"".join(lines))
    bad = verify([one_file]).first_bad
    assert bad is not None and bad.line == 6 and "out of order or repeated" in bad.why


def test_removing_a_file_in_the_middle_of_the_set_is_detected(three_files: list[Path]) -> None:
    missing = three_files[1]
    given = [p for p in three_files if p != missing]
    bad = verify(given).first_bad
    assert bad is not None and bad.file == str(three_files[2]) and bad.line == 1
    assert "a file of the set is missing" in bad.why
    # Also when the file is deleted from the directory that is verified.
    missing.unlink()
    bad = verify([three_files[0].parent]).first_bad
    assert bad is not None and bad.file == str(three_files[2]) and bad.line == 1


def test_a_file_cut_short_in_the_middle_of_the_set_is_detected(three_files: list[Path]) -> None:
    middle = three_files[1]
    lines = lines_of(middle)
    middle.write_bytes(b"".join(lines[:-2]))  # its last two records removed
    bad = verify(three_files).first_bad
    assert bad is not None and bad.file == str(three_files[2]) and bad.line == 1
    # Cut inside a record: the middle file itself is reported.
    middle.write_bytes(b"".join(lines)[:-10])
    bad = verify(three_files).first_bad
    assert bad is not None and bad.file == str(middle) and "incomplete last line" in bad.why


def test_records_cut_from_the_start_of_a_file_are_detected(three_files: list[Path]) -> None:
    middle = three_files[1]
    middle.write_bytes(b"".join(lines_of(middle)[1:]))
    bad = verify(three_files).first_bad
    assert bad is not None and bad.file == str(middle) and bad.line == 1
    assert "file name says" in bad.why


def test_a_chain_given_from_the_middle_verifies_but_says_so(
    three_files: list[Path], tmp_path: Path
) -> None:
    result = verify(three_files[1:])
    assert result.ok and not result.from_genesis
    out = io.StringIO()
    assert run_verify([str(p) for p in three_files[1:]], out) == 0
    assert "note: the chain starts at seq" in out.getvalue()


def test_a_forged_genesis_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    record = json.loads(lines[0])
    record["prev"] = "1" * 64
    record["hash"] = record_hash(record)
    one_file.write_bytes(canonical(record) + b"\n" + b"".join(lines[1:]))
    bad = verify([one_file]).first_bad
    assert bad is not None and bad.line == 1 and "64 zeros" in bad.why
    assert GENESIS == "0" * 64


def test_non_canonical_and_unknown_content_is_detected(one_file: Path) -> None:
    lines = lines_of(one_file)
    record = json.loads(lines[2])
    spaced = json.dumps(record, sort_keys=True).encode() + b"\n"  # valid JSON, not canonical
    bad = verify_with(one_file, lines, 2, spaced)
    assert "canonical" in bad
    record["extra"] = 1
    assert "unknown field" in verify_with(one_file, lines, 2, canonical(record) + b"\n")
    assert "not a JSON" in verify_with(one_file, lines, 2, b"\xff\xfe\n")
    assert "not a JSON" in verify_with(one_file, lines, 2, b"\n")


def verify_with(path: Path, lines: list[bytes], index: int, replacement: bytes) -> str:
    changed = list(lines)
    changed[index] = replacement
    path.write_bytes(b"".join(changed))
    bad = verify([path]).first_bad
    assert bad is not None and bad.line == index + 1
    return bad.why


def test_kmsctl_audit_verify_output_and_exit_status(
    one_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["audit", "verify", str(one_file)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "OK: 30 records"
    lines = lines_of(one_file)
    del lines[14]
    one_file.write_bytes(b"".join(lines))
    assert cli.main(["audit", "verify", str(one_file)]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"BROKEN at {one_file}:15 (seq 16): ")
    assert cli.main(["audit", "verify", str(one_file.parent / "nope.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_verify_reports_recovery_records(tmp_path: Path, one_file: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(one_file.parent, copy)
    path = copy / one_file.name
    path.write_bytes(path.read_bytes() + b'{"torn')
    make_log(copy, count=1)  # restarts on the torn tail: cut, recovery record, one more
    result = verify([copy])
    assert result.ok and result.records == 32
    assert [r.seq for r in result.recoveries] == [31]
    out = io.StringIO()
    run_verify([str(copy)], out)
    assert "recovery record" in out.getvalue() and "torn_tail_cut" in out.getvalue()
