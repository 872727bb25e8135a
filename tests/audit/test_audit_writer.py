"""kmsd.audit.writer: group commit, rotation, fail closed and recovery, restart, torn tails."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from audit_records import audit_records

from kms_client.audit_verify import GENESIS, audit_files, file_name, verify
from kmsd.audit import writer as writer_module
from kmsd.audit.record import AuditEvent
from kmsd.audit.writer import AuditUnavailable, AuditWriter
from kmsd.clock import FakeClock
from kmsd.errors import StorageCorruptedError


def event(n: int, outcome: str = "ok") -> AuditEvent:
    return AuditEvent(
        operation="Encrypt",
        outcome=outcome,
        source=f"ipv4:127.0.0.1:{1000 + n}",
        key_arn="arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        request_id=f"req-{n}",
        encryption_context={"n": str(n)},
        error_reason="" if outcome == "ok" else "NOT_FOUND",
        aws_exception="" if outcome == "ok" else "NotFoundException",
    )


class Syncs:
    """An injected syncer: counts calls, can hold them, can fail them."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(5, "Input/output error (injected)")
        os.fdatasync(fd)


def run(
    directory: Path,
    scenario: Callable[[AuditWriter], Awaitable[None]],
    **options: Any,
) -> None:
    async def main() -> None:
        writer = AuditWriter(directory, 7, clock=FakeClock(), **options)
        await writer.start()
        try:
            await scenario(writer)
        finally:
            await writer.stop()

    asyncio.run(main())


def test_records_are_chained_and_verify(tmp_path: Path) -> None:
    async def scenario(writer: AuditWriter) -> None:
        for n in range(5):
            await writer.record(event(n, "ok" if n % 2 else "error"))

    run(tmp_path, scenario)
    got = audit_records(tmp_path)
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5]
    assert got[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(got, got[1:], strict=False))
    assert got[0]["node"] == 7 and got[0]["time"] == "2026-01-01T00:00:00.000Z"
    assert got[1]["encryption_context"] == {"n": "1"}
    assert (tmp_path / file_name(1)).exists()
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / file_name(1)).stat().st_mode & 0o777) == "0o600"
    result = verify([tmp_path])
    assert result.ok and result.records == 5


def test_group_commit_writes_concurrent_records_with_one_fsync(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.calls = 0
        syncs.gate.clear()
        first = asyncio.ensure_future(writer.record(event(0)))
        # Wait until the first record's fsync is running, then queue 50 more meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, syncs.entered.wait, 10)
        rest = [asyncio.ensure_future(writer.record(event(n))) for n in range(1, 51)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in rest), "acknowledged before it was durable"
        syncs.gate.set()
        await asyncio.gather(first, *rest)
        assert syncs.calls == 2, f"{syncs.calls} fsyncs for 2 batches"
        assert writer.batches == 2

    run(tmp_path, scenario, inline_sync=False, syncer=syncs)
    assert verify([tmp_path]).records == 51


def test_under_load_an_fsync_waits_while_records_keep_coming(tmp_path: Path) -> None:
    """The sync thread's gathering: it waits while every slice brings new records (up
    to its deadline), and stops after the first slice that brings none."""
    writer = AuditWriter(tmp_path, 1, gather_slice_s=0.005)
    started = time.monotonic()
    writer._gather(started + 1.0)  # noqa: SLF001 - the sync thread's policy, tested alone
    assert time.monotonic() - started < 0.5, "no records coming: one slice, not the deadline"

    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            writer._written = (n, "", 0)  # noqa: SLF001 - what the loop does per write
            time.sleep(0.0005)

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        started = time.monotonic()
        writer._gather(started + 0.1)  # noqa: SLF001
        assert time.monotonic() - started >= 0.095, "records kept coming: up to the deadline"
    finally:
        stop.set()
        feeder.join()


def test_record_returns_only_after_its_fsync(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.gate.clear()
        pending = asyncio.ensure_future(writer.record(event(1)))
        await asyncio.sleep(0.05)
        assert not pending.done()
        syncs.gate.set()
        await pending

    run(tmp_path, scenario, inline_sync=False, syncer=syncs)


class ThreadRecordingSyncs(Syncs):
    """Also records which thread each sync ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[threading.Thread] = []

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.current_thread())
        super().__call__(fd)


def test_a_lone_record_is_synced_on_the_loop_before_it_is_answered(tmp_path: Path) -> None:
    syncs = ThreadRecordingSyncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.threads.clear()  # start() syncs too, in a worker thread
        for n in range(3):
            before = syncs.calls
            await writer.record(event(n))
            assert syncs.calls == before + 1, "answered before its own fsync"
            # Lone callers, spaced out: each sync far from the previous one.
            await asyncio.sleep(0.01)
        assert syncs.threads == [threading.main_thread()] * 3
        # Another call in flight (its record to come): the sync thread syncs, so that
        # the record it will write can share that fsync rather than wait for the loop.
        writer.calls_in_flight = 2
        await writer.record(event(3))
        assert syncs.threads[3] is not threading.main_thread()

    run(tmp_path, scenario, syncer=syncs)
    assert verify([tmp_path]).records == 4


def test_records_arriving_together_are_synced_by_the_sync_thread_in_groups(
    tmp_path: Path,
) -> None:
    syncs = ThreadRecordingSyncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.calls = 0  # start() syncs too
        syncs.threads.clear()
        await asyncio.gather(*(writer.record(event(n)) for n in range(200)))
        # One write of 200 records (submitted in one turn of the loop): not a lone one.
        assert syncs.calls == 1
        assert syncs.threads[0] is not threading.main_thread()

    run(tmp_path, scenario, syncer=syncs)
    assert verify([tmp_path]).records == 200


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    async def scenario(writer: AuditWriter) -> None:
        for n in range(40):
            await writer.record(event(n))

    run(tmp_path, scenario, max_file_bytes=2000)
    files = audit_files(tmp_path)
    assert len(files) > 3
    seqs = [json.loads(p.read_bytes().splitlines()[0])["seq"] for p in files]
    assert [p.name for p in files] == [file_name(s) for s in seqs]
    # Every file but the last reached the limit (rotation happens once it is reached).
    assert all(p.stat().st_size >= 2000 for p in files[:-1])
    got = audit_records(tmp_path)
    assert [r["seq"] for r in got] == list(range(1, 41))
    first_of_second = json.loads(files[1].read_bytes().splitlines()[0])
    last_of_first = json.loads(files[0].read_bytes().splitlines()[-1])
    assert first_of_second["prev"] == last_of_first["hash"]
    assert verify(files).ok


def test_restart_continues_the_chain_from_the_newest_file(tmp_path: Path) -> None:
    async def first(writer: AuditWriter) -> None:
        for n in range(12):
            await writer.record(event(n))

    async def second(writer: AuditWriter) -> None:
        assert writer.start_cut is None
        await writer.record(event(99))

    run(tmp_path, first, max_file_bytes=2000)
    before = audit_records(tmp_path)
    run(tmp_path, second, max_file_bytes=2000)
    after = audit_records(tmp_path)
    assert after[:-1] == before
    assert after[-1]["seq"] == 13 and after[-1]["prev"] == before[-1]["hash"]
    assert verify([tmp_path]).records == 13


def _write_some(directory: Path, count: int) -> None:
    async def scenario(writer: AuditWriter) -> None:
        for n in range(count):
            await writer.record(event(n))

    run(directory, scenario)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b'{"aws_exception":"","det', "an incomplete last line"),
        (b"\x00" * 300, "an incomplete last line"),
        (b'{"not":"a record"}\n\x00\x00', "1 invalid line(s) at the end"),
    ],
)
def test_torn_tail_is_cut_and_named_by_a_recovery_record(
    tmp_path: Path, garbage: bytes, reason: str
) -> None:
    _write_some(tmp_path, 3)
    path = tmp_path / file_name(1)
    intact = path.read_bytes()
    path.write_bytes(intact + garbage)

    async def scenario(writer: AuditWriter) -> None:
        assert writer.start_cut is not None
        await writer.record(event(50))

    run(tmp_path, scenario)
    got = audit_records(tmp_path)
    assert path.read_bytes().startswith(intact)
    recovery = got[3]
    assert recovery["operation"] == "AuditRecovery" and recovery["principal"] == "kmsd"
    assert recovery["detail"]["event"] == "torn_tail_cut"
    assert recovery["detail"]["offset"] == len(intact)
    assert recovery["detail"]["cut_bytes"] == len(garbage)
    assert recovery["detail"]["reason"] == reason
    assert (tmp_path / recovery["detail"]["broken_copy"]).read_bytes() == garbage
    assert got[4]["request_id"] == "req-50"
    result = verify([tmp_path])
    assert result.ok and result.records == 5
    assert [r.seq for r in result.recoveries] == [4]


def test_a_torn_first_record_of_a_rotated_file_continues_from_the_file_before(
    tmp_path: Path,
) -> None:
    _write_some(tmp_path, 3)
    (tmp_path / file_name(4)).write_bytes(b'{"aws_exc')

    async def scenario(writer: AuditWriter) -> None:
        await writer.record(event(9))

    run(tmp_path, scenario)
    got = audit_records(tmp_path)
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5]
    assert got[3]["operation"] == "AuditRecovery"
    assert verify([tmp_path]).ok


def test_an_empty_newest_file_is_reused(tmp_path: Path) -> None:
    async def nothing(writer: AuditWriter) -> None:
        pass

    run(tmp_path, nothing)
    assert (tmp_path / file_name(1)).read_bytes() == b""
    _write_some(tmp_path, 2)
    assert [p.name for p in audit_files(tmp_path)] == [file_name(1)]
    assert verify([tmp_path]).records == 2


def test_start_refuses_a_chain_it_cannot_continue(tmp_path: Path) -> None:
    (tmp_path / file_name(8)).write_bytes(b"garbage")

    async def nothing(writer: AuditWriter) -> None:
        pass

    with pytest.raises(StorageCorruptedError, match="cannot continue"):
        run(tmp_path, nothing)


def test_fsync_failure_fails_the_request_and_closes_the_log_until_it_recovers(
    tmp_path: Path,
) -> None:
    syncs = Syncs()
    states: list[bool] = []

    async def scenario(writer: AuditWriter) -> None:
        await writer.record(event(1))
        syncs.fail_next = 1
        with pytest.raises(AuditUnavailable):
            await writer.record(event(2))
        assert not writer.available and states == [False]
        # No request may succeed without its record: refused at once.
        with pytest.raises(AuditUnavailable, match="cannot be written"):
            writer.submit(event(3))
        for _ in range(200):
            if writer.available and states == [False, True]:
                break
            await asyncio.sleep(0.01)
        assert writer.available and states == [False, True]
        await writer.record(event(4))

    run(
        tmp_path,
        scenario,
        syncer=syncs,
        retry_interval_s=0.01,
        on_availability=states.append,
    )
    got = audit_records(tmp_path)
    # Record 2 (refused request) was written but never acknowledged: it was cut, and
    # the recovery record says so; the chain continues from record 1.
    assert [r["request_id"] for r in got] == ["req-1", "", "req-4"]
    recovery = got[1]
    assert recovery["operation"] == "AuditRecovery" and recovery["seq"] == 2
    assert recovery["detail"]["event"] == "write_failed"
    assert "Input/output error" in recovery["detail"]["error"]
    assert recovery["detail"]["refused_records"] == 1
    assert recovery["detail"]["last_acknowledged_seq"] == 1
    assert recovery["detail"]["cut_bytes"] > 0
    assert len(audit_files(tmp_path)) == 2, "recovery continues in a fresh file"
    result = verify([tmp_path])
    assert result.ok, result.first_bad
    assert result.records == 3


def test_a_write_failure_refuses_every_queued_record(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.gate.clear()
        syncs.fail_next = 1
        first = asyncio.ensure_future(writer.record(event(0)))
        await asyncio.get_running_loop().run_in_executor(None, syncs.entered.wait, 10)
        queued = [asyncio.ensure_future(writer.record(event(n))) for n in range(1, 6)]
        await asyncio.sleep(0)
        syncs.gate.set()
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        assert all(isinstance(r, AuditUnavailable) for r in results)

    run(tmp_path, scenario, inline_sync=False, syncer=syncs, retry_interval_s=60)


def test_recovery_keeps_retrying_while_the_disk_keeps_failing(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        await writer.record(event(1))
        syncs.fail_next = 6  # the write, then the first recovery attempts fail too
        with pytest.raises(AuditUnavailable):
            await writer.record(event(2))
        for _ in range(500):
            if writer.available and syncs.fail_next == 0:
                break
            await asyncio.sleep(0.01)
        assert writer.available and syncs.fail_next == 0
        await writer.record(event(3))

    run(tmp_path, scenario, syncer=syncs, retry_interval_s=0.01)
    got = audit_records(tmp_path)
    assert [r["request_id"] for r in got] == ["req-1", "", "req-3"]
    assert got[1]["detail"]["cut_bytes"] > 0, "the cut of a failed attempt is still named"
    assert verify([tmp_path]).ok


def test_a_cancelled_caller_leaves_the_chain_intact(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        syncs.gate.clear()
        task = asyncio.ensure_future(writer.record(event(1)))
        await asyncio.get_running_loop().run_in_executor(None, syncs.entered.wait, 10)
        task.cancel()
        syncs.gate.set()
        await writer.record(event(2))

    run(tmp_path, scenario, inline_sync=False, syncer=syncs)
    assert [r["request_id"] for r in audit_records(tmp_path)] == ["req-1", "req-2"]
    assert verify([tmp_path]).ok


def test_without_fsync_nothing_is_synced(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario(writer: AuditWriter) -> None:
        await writer.record(event(1))

    run(tmp_path, scenario, syncer=syncs, fsync=False)
    assert syncs.calls == 0
    assert verify([tmp_path]).records == 1


def test_submit_after_stop_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        writer = AuditWriter(tmp_path, 1, clock=FakeClock())
        await writer.start()
        await writer.stop()
        with pytest.raises(AuditUnavailable):
            writer.submit(event(1))

    asyncio.run(main())


@pytest.mark.parametrize("window", [1, 3, 8, 64, 1 << 18])
def test_lines_are_read_back_from_the_end_whatever_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """The reverse reader behind start-up (torn tails, the last log-backed record) gives
    every newline-ended line, last first, with the offset just past it."""
    monkeypatch.setattr(writer_module, "_TAIL_WINDOW", window)
    rng = random.Random(window)
    for case in range(30):
        lines = [
            bytes(rng.choice(b"ab{}") for _ in range(rng.randrange(0, 12)))
            for _ in range(rng.randrange(0, 8))
        ]
        tail = bytes(rng.choice(b"xyz") for _ in range(rng.randrange(0, 5)))  # unterminated
        path = tmp_path / f"f{case}"
        path.write_bytes(b"".join(line + b"\n" for line in lines) + tail)
        expected, offset = [], 0
        for line in lines:
            offset += len(line) + 1
            expected.append((offset, line))
        assert list(writer_module._lines_from_end(path)) == expected[::-1]
