"""Tests for kmsd.log.single_node: ordering, recovery, snapshots, group commit, fail-stop."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from kmsd.errors import StorageCorruptedError, UnavailableError
from kmsd.log.base import Applied, CommandLog
from kmsd.log.single_node import SingleNodeLog
from kmsd.storage.snapshots import SnapshotStore, snapshot_name

T = TypeVar("T")
WAIT = 10.0  # seconds; a safety net for thread handshakes, never a delay


class ListMachine:
    """A trivial deterministic state machine: the list of commands applied."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.commands: list[bytes] = []
        self._applied = 0
        self._fail_on = fail_on

    def apply(self, index: int, command: bytes) -> object:
        assert index == self._applied + 1, (index, self._applied)
        if command == self._fail_on:
            raise RuntimeError("bug in apply")
        self.commands.append(command)
        self._applied = index
        return f"result-{index}"

    def snapshot(self) -> bytes:
        state = {"applied": self._applied, "commands": [c.hex() for c in self.commands]}
        return json.dumps(state).encode()

    def freeze(self) -> Iterator[bytes]:
        return iter([self.snapshot()])

    def restore(self, data: bytes) -> None:
        state = json.loads(data)
        self._applied = state["applied"]
        self.commands = [bytes.fromhex(c) for c in state["commands"]]

    @property
    def applied_index(self) -> int:
        return self._applied


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class BlockingSyncer:
    """fdatasync that holds its first call until released (to observe group commit),
    optionally failing it."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._fail_first = fail_first

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(WAIT)
            if self._fail_first:
                raise OSError(errno.EIO, "injected fsync failure")
        os.fdatasync(fd)

    async def wait_entered(self) -> None:
        # Waits in a thread so the event loop keeps running meanwhile.
        assert await asyncio.to_thread(self.entered.wait, WAIT)


async def settle() -> None:
    """Lets every ready task run its next step (e.g. enqueue its proposal)."""
    await asyncio.sleep(0)


def test_is_a_command_log(tmp_path: Path) -> None:
    log: CommandLog = SingleNodeLog(tmp_path, ListMachine())
    assert log.is_leader()
    assert log.failure is None


def test_proposals_are_applied_in_order_with_results(tmp_path: Path) -> None:
    machine = ListMachine()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine)
        await log.start()
        assert await log.read_barrier() == 0
        first = await log.propose(b"a")
        assert first == Applied(1, "result-1")
        many = await asyncio.gather(*(log.propose(b"c%d" % i) for i in range(20)))
        assert many == [Applied(i + 2, f"result-{i + 2}") for i in range(20)]
        assert await log.read_barrier() == 21
        assert log.applied_index == 21
        await log.stop()

    run(scenario())
    assert machine.commands == [b"a"] + [b"c%d" % i for i in range(20)]


def test_restart_rebuilds_identical_state_without_snapshots(tmp_path: Path) -> None:
    first = ListMachine()

    async def write() -> None:
        log = SingleNodeLog(tmp_path, first, segment_bytes=200)
        await log.start()
        for i in range(30):
            await log.propose(b"cmd-%d" % i)
        await log.stop()

    run(write())
    assert SnapshotStore.open(tmp_path / "snap").indexes() == []

    second = ListMachine()

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, second, segment_bytes=200)
        await log.start()
        assert log.applied_index == 30
        assert await log.propose(b"after") == Applied(31, "result-31")
        await log.stop()

    run(reopen())
    assert second.commands == first.commands + [b"after"]
    assert second.applied_index == 31


def test_restart_rebuilds_identical_state_from_snapshots(tmp_path: Path) -> None:
    first = ListMachine()

    async def write() -> SingleNodeLog:
        log = SingleNodeLog(tmp_path, first, snapshot_every=7, segment_bytes=150)
        await log.start()
        for i in range(50):
            await log.propose(b"cmd-%d" % i)
        await log.stop()
        return log

    log = run(write())
    store = SnapshotStore.open(tmp_path / "snap")
    assert len(store.indexes()) == 2  # the newest two are kept
    # stop() waits for an in-flight snapshot and its compaction.
    assert log.snapshot_index == store.indexes()[-1] >= 7
    segments = sorted((tmp_path / "wal").glob("wal-*.log"))
    assert segments[0].name != "wal-0000000000000001.log"  # compaction happened

    second = ListMachine()

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, second, snapshot_every=7, segment_bytes=150)
        await log.start()
        assert log.applied_index == 50
        await log.propose(b"after")
        await log.stop()

    run(reopen())
    assert second.commands == first.commands + [b"after"]


def test_no_snapshot_while_before_compaction_fails(tmp_path: Path) -> None:
    """`before_compaction` (the audit records of mutations made durable) runs before each
    snapshot; while it raises, no snapshot is taken and the WAL keeps every entry."""
    refused: list[int] = []
    allowed = threading.Event()

    def before_compaction() -> None:
        if not allowed.is_set():
            refused.append(1)
            raise OSError(errno.EIO, "the audit log cannot be synced")

    async def scenario() -> None:
        log = SingleNodeLog(
            tmp_path, ListMachine(), snapshot_every=3, before_compaction=before_compaction
        )
        await log.start()
        for i in range(12):
            await log.propose(b"cmd-%d" % i)
        assert refused and log.snapshot_index == 0
        assert SnapshotStore.open(tmp_path / "snap").indexes() == []
        allowed.set()
        await log.propose(b"last")
        await log.stop()  # waits for the snapshot now under way
        assert log.snapshot_index == 13

    run(scenario())


def test_group_commit_batches_proposals_queued_during_fsync(tmp_path: Path) -> None:
    syncer = BlockingSyncer()
    machine = ListMachine()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, datasync=syncer)
        await log.start()
        head = asyncio.create_task(log.propose(b"head"))
        await syncer.wait_entered()
        # The first fdatasync is in flight; these must all ride on the next one.
        rest = [asyncio.create_task(log.propose(b"p%d" % i)) for i in range(50)]
        await settle()
        syncer.release.set()
        results = await asyncio.gather(head, *rest)
        assert [r.index for r in results] == list(range(1, 52))
        assert syncer.calls == 2
        await log.stop()

    run(scenario())
    assert machine.commands == [b"head"] + [b"p%d" % i for i in range(50)]


def test_batches_are_capped_by_bytes(tmp_path: Path) -> None:
    syncer = BlockingSyncer()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(), datasync=syncer, max_batch_bytes=100)
        await log.start()
        head = asyncio.create_task(log.propose(b"head"))
        await syncer.wait_entered()
        rest = [asyncio.create_task(log.propose(b"x" * 40)) for _ in range(6)]
        await settle()
        syncer.release.set()
        await asyncio.gather(head, *rest)
        assert syncer.calls == 1 + 3  # two 40-byte commands per 100-byte batch
        await log.stop()

    run(scenario())


def test_fsync_failure_is_fail_stop(tmp_path: Path) -> None:
    syncer = BlockingSyncer(fail_first=True)
    fatal: list[BaseException] = []

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(), datasync=syncer, on_fatal=fatal.append)
        await log.start()
        head = asyncio.create_task(log.propose(b"head"))
        await syncer.wait_entered()
        queued = [asyncio.create_task(log.propose(b"q%d" % i)) for i in range(3)]
        await settle()
        syncer.release.set()
        outcomes = await asyncio.gather(head, *queued, return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, UnavailableError)
            assert "log failed" in str(outcome) and "injected fsync failure" in str(outcome)
        assert isinstance(log.failure, OSError)
        assert fatal == [log.failure]
        with pytest.raises(UnavailableError, match="log failed"):
            await log.propose(b"later")
        with pytest.raises(UnavailableError, match="log failed"):
            await log.read_barrier()
        assert syncer.calls == 1  # never retried
        await log.stop()
        assert log.failure is fatal[0]

    run(scenario())


def test_apply_exception_is_fail_stop(tmp_path: Path) -> None:
    fatal: list[BaseException] = []
    machine = ListMachine(fail_on=b"boom")

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, on_fatal=fatal.append)
        await log.start()
        outcomes = await asyncio.gather(
            log.propose(b"ok"), log.propose(b"boom"), log.propose(b"next"), return_exceptions=True
        )
        assert outcomes[0] == Applied(1, "result-1")
        assert isinstance(outcomes[1], UnavailableError)
        assert isinstance(outcomes[2], UnavailableError)
        assert "apply of index 2 raised RuntimeError" in str(outcomes[1])
        assert isinstance(log.failure, RuntimeError)
        assert fatal == [log.failure]
        await log.stop()

    run(scenario())
    assert machine.commands == [b"ok"]


def test_snapshot_write_failure_is_fail_stop(tmp_path: Path) -> None:
    fatal: list[BaseException] = []

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "injected snapshot failure")

    async def scenario() -> None:
        log = SingleNodeLog(
            tmp_path, ListMachine(), snapshot_every=2, snapshot_fsync=failing, on_fatal=fatal.append
        )
        await log.start()
        await log.propose(b"a")
        await log.propose(b"b")  # triggers the snapshot
        await log.stop()
        assert isinstance(log.failure, OSError)
        assert fatal == [log.failure]

    run(scenario())


def test_proposals_before_start_and_after_stop_are_unavailable(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, ListMachine())
        with pytest.raises(UnavailableError, match="new"):
            await log.propose(b"early")
        await log.start()
        await log.propose(b"a")
        await log.stop()
        await log.stop()  # idempotent
        with pytest.raises(UnavailableError, match="stopped"):
            await log.propose(b"late")
        with pytest.raises(UnavailableError):
            await log.read_barrier()
        assert log.failure is None
        with pytest.raises(RuntimeError):
            await log.start()

    run(scenario())


def test_stop_answers_the_inflight_write_and_fails_queued_proposals(tmp_path: Path) -> None:
    syncer = BlockingSyncer()
    machine = ListMachine()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, datasync=syncer)
        await log.start()
        head = asyncio.create_task(log.propose(b"head"))
        await syncer.wait_entered()
        queued = [asyncio.create_task(log.propose(b"q%d" % i)) for i in range(3)]
        await settle()
        stopping = asyncio.create_task(log.stop())
        await settle()
        syncer.release.set()
        await stopping
        assert await head == Applied(1, "result-1")
        for task in queued:
            with pytest.raises(UnavailableError, match="log stopped"):
                await task
        assert log.failure is None

    run(scenario())
    assert machine.commands == [b"head"]


def test_cancelled_queued_proposal_is_not_written(tmp_path: Path) -> None:
    syncer = BlockingSyncer()
    machine = ListMachine()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, datasync=syncer)
        await log.start()
        head = asyncio.create_task(log.propose(b"head"))
        await syncer.wait_entered()
        withdrawn = asyncio.create_task(log.propose(b"withdrawn"))
        kept = asyncio.create_task(log.propose(b"kept"))
        await settle()
        withdrawn.cancel()
        syncer.release.set()
        assert (await head).index == 1
        assert (await kept).index == 2
        assert withdrawn.cancelled()
        await log.stop()

    run(scenario())
    assert machine.commands == [b"head", b"kept"]


def test_crash_between_snapshot_rename_and_compaction(tmp_path: Path) -> None:
    # Build a WAL with 20 entries and no snapshot, then plant a snapshot as if the
    # process died right after renaming it into place: no marker, no compaction.
    first = ListMachine()

    async def write() -> None:
        log = SingleNodeLog(tmp_path, first, segment_bytes=120)
        await log.start()
        for i in range(20):
            await log.propose(b"cmd-%d" % i)
        await log.stop()

    run(write())
    partial = ListMachine()
    for index, command in enumerate(first.commands[:12], start=1):
        partial.apply(index, command)
    SnapshotStore.open(tmp_path / "snap").save(12, 1, partial.snapshot())
    # A second, interrupted save left its temp file behind.
    (tmp_path / "snap" / (snapshot_name(20) + ".tmp")).write_bytes(b"torn")

    second = ListMachine()

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, second, segment_bytes=120, snapshot_every=5)
        await log.start()
        assert log.snapshot_index == 12
        assert log.applied_index == 20
        assert await log.propose(b"after") == Applied(21, "result-21")
        await log.stop()

    run(reopen())
    assert second.commands == first.commands + [b"after"]
    assert not (tmp_path / "snap" / (snapshot_name(20) + ".tmp")).exists()

    third = ListMachine()

    async def reopen_again() -> None:
        log = SingleNodeLog(tmp_path, third, segment_bytes=120)
        await log.start()
        await log.stop()

    run(reopen_again())
    assert third.commands == second.commands


def test_missing_snapshot_after_compaction_refuses_to_start(tmp_path: Path) -> None:
    async def write() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(), snapshot_every=5, segment_bytes=120)
        await log.start()
        for i in range(30):
            await log.propose(b"cmd-%d" % i)
        await log.stop()

    run(write())
    for path in (tmp_path / "snap").iterdir():
        path.unlink()

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(), segment_bytes=120)
        with pytest.raises(StorageCorruptedError, match="in neither the snapshot nor the WAL"):
            await log.start()
        with pytest.raises(UnavailableError):
            await log.propose(b"x")
        await log.stop()

    run(reopen())


def test_snapshot_ahead_of_wal_refuses_to_start(tmp_path: Path) -> None:
    async def write() -> None:
        log = SingleNodeLog(tmp_path, ListMachine())
        await log.start()
        await log.propose(b"only")
        await log.stop()

    run(write())
    SnapshotStore.open(tmp_path / "snap").save(5, 1, ListMachine().snapshot())

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, ListMachine())
        with pytest.raises(
            StorageCorruptedError, match="covers index 5 but the WAL ends at index 1"
        ):
            await log.start()

    run(reopen())


def test_torn_tail_is_repaired_on_start(tmp_path: Path) -> None:
    first = ListMachine()

    async def write() -> None:
        log = SingleNodeLog(tmp_path, first)
        await log.start()
        for i in range(5):
            await log.propose(b"cmd-%d" % i)
        await log.stop()

    run(write())
    (segment,) = (tmp_path / "wal").glob("wal-*.log")
    with open(segment, "ab") as f:
        f.write(b"\x30\x00\x00\x00partial record")

    second = ListMachine()

    async def reopen() -> SingleNodeLog:
        log = SingleNodeLog(tmp_path, second)
        await log.start()
        assert await log.propose(b"after") == Applied(6, "result-6")
        await log.stop()
        return log

    log = run(reopen())
    assert log.tail_repair is not None and log.tail_repair.segment == segment
    assert second.commands == first.commands + [b"after"]


def test_on_fatal_errors_do_not_mask_the_failure(tmp_path: Path) -> None:
    def exploding(exc: BaseException) -> None:
        raise RuntimeError("callback bug")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(), datasync=failing, on_fatal=exploding)
        await log.start()
        with pytest.raises(UnavailableError, match="log failed"):
            await log.propose(b"a")
        assert isinstance(log.failure, OSError)
        await log.stop()

    run(scenario())


def test_rejects_bad_snapshot_every(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SingleNodeLog(tmp_path, ListMachine(), snapshot_every=0)


def test_snapshot_write_does_not_stall_commits(tmp_path: Path) -> None:
    snapshot_sync = BlockingSyncer()
    machine = ListMachine()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, snapshot_every=2, snapshot_fsync=snapshot_sync)
        await log.start()
        await log.propose(b"a")
        await log.propose(b"b")  # starts the snapshot at index 2
        await snapshot_sync.wait_entered()
        # The snapshot's fsync is held, yet proposals still commit.
        assert (await log.propose(b"c")).index == 3
        assert (await log.propose(b"d")).index == 4
        assert log.snapshot_index == 0
        stopping = asyncio.create_task(log.stop())
        await settle()
        snapshot_sync.release.set()
        await stopping
        assert log.snapshot_index == 2
        assert log.failure is None

    run(scenario())
    assert SnapshotStore.open(tmp_path / "snap").indexes() == [2]
    assert machine.commands == [b"a", b"b", b"c", b"d"]


def test_apply_failure_during_replay_fails_start(tmp_path: Path) -> None:
    async def write() -> None:
        log = SingleNodeLog(tmp_path, ListMachine())
        await log.start()
        await log.propose(b"fine")
        await log.propose(b"boom")
        await log.stop()

    run(write())

    async def reopen() -> None:
        log = SingleNodeLog(tmp_path, ListMachine(fail_on=b"boom"))
        with pytest.raises(RuntimeError, match="bug in apply"):
            await log.start()
        await log.stop()
        await log.stop()
        with pytest.raises(UnavailableError):
            await log.propose(b"x")

    run(reopen())


class GatedEncoding(ListMachine):
    """A ListMachine whose frozen snapshot waits for `release` before it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def freeze(self) -> Iterator[bytes]:
        data = self.snapshot()

        def encode() -> Iterator[bytes]:
            self.entered.set()
            assert self.release.wait(WAIT)
            yield data

        return encode()


def test_snapshot_encoding_runs_off_the_loop_and_is_the_frozen_state(tmp_path: Path) -> None:
    machine = GatedEncoding()

    async def scenario() -> None:
        log = SingleNodeLog(tmp_path, machine, snapshot_every=2)
        await log.start()
        await log.propose(b"a")
        await log.propose(b"b")  # freezes the state at index 2
        assert await asyncio.to_thread(machine.entered.wait, WAIT)
        # Encoding is held, yet proposals still commit.
        assert (await log.propose(b"c")).index == 3
        assert log.snapshot_index == 0
        machine.release.set()
        await log.stop()
        assert log.snapshot_index == 2

    run(scenario())
    store = SnapshotStore.open(tmp_path / "snap")
    latest = store.load_latest()
    assert latest is not None and latest.index == 2
    assert json.loads(latest.data)["commands"] == [b"a".hex(), b"b".hex()]
