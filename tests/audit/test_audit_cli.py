"""`kmsctl audit tail`: last records, human-readable; --follow across appends and rotation."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import pytest

from kms_client import cli
from kms_client.audit_cli import run_tail
from kms_client.audit_verify import audit_files
from kmsd.audit.record import AuditEvent
from kmsd.audit.writer import AuditWriter
from kmsd.clock import FakeClock


def write(directory: Path, operations: list[str], max_file_bytes: int = 1 << 30) -> None:
    async def main() -> None:
        writer = AuditWriter(directory, 2, clock=FakeClock(), max_file_bytes=max_file_bytes)
        await writer.start()
        for n, operation in enumerate(operations):
            await writer.record(
                AuditEvent(
                    operation=operation,
                    outcome="error" if operation == "DescribeKey" else "ok",
                    error_reason="NOT_FOUND" if operation == "DescribeKey" else "",
                    aws_exception="NotFoundException" if operation == "DescribeKey" else "",
                    key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
                    source="ipv4:127.0.0.1:9",
                    request_id=f"r{n}",
                    encryption_context={"tenant": "a"},
                )
            )
        await writer.stop()

    asyncio.run(main())


def test_tail_prints_the_last_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, ["Encrypt", "Decrypt", "DescribeKey"])
    assert cli.main(["audit", "tail", str(tmp_path), "-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0] == (
        "2026-01-01T00:00:00.000Z  #2  node 2  Decrypt  ok"
        "  key=arn:aws:kms:us-east-1:111122223333:key/k  principal=-"
        '  source=ipv4:127.0.0.1:9  request_id=r1  context={"tenant": "a"}'
    )
    assert "DescribeKey  ERROR NotFoundException (NOT_FOUND)" in lines[1]
    assert cli.main(["audit", "tail", str(audit_files(tmp_path)[0]), "--raw", "-n", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_tail_marks_a_broken_record(tmp_path: Path) -> None:
    write(tmp_path, ["Encrypt", "Decrypt", "Encrypt"])
    path = audit_files(tmp_path)[0]
    path.write_bytes(path.read_bytes().replace(b'"Decrypt"', b'"Decrypx"'))
    out = io.StringIO()
    assert run_tail(str(path), 0, False, False, out) == 0
    text = out.getvalue()
    assert "!! audit-0000000000000001.jsonl:2: bad record: hash does not match" in text


def test_follow_shows_appends_and_moves_to_the_next_file_on_rotation(tmp_path: Path) -> None:
    write(tmp_path, ["Encrypt"], max_file_bytes=600)
    out = io.StringIO()
    done = threading.Event()
    follower = threading.Thread(
        target=run_tail,
        args=(str(tmp_path), 10, True, False, out),
        kwargs={"stop": done.is_set, "poll_seconds": 0.01},
    )
    follower.start()
    try:
        time.sleep(0.1)
        write(tmp_path, ["Decrypt", "GenerateDataKey", "DescribeKey", "ReEncrypt"], 600)
        assert len(audit_files(tmp_path)) > 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "#5" not in out.getvalue():
            time.sleep(0.01)
    finally:
        done.set()
        follower.join(10)
    shown = [line.split("  ")[1] for line in out.getvalue().splitlines()]
    assert shown == ["#1", "#2", "#3", "#4", "#5"]
    assert "!!" not in out.getvalue()
