"""`SingleNodeLog`: the `CommandLog` of a one-node deployment, over a local WAL and snapshots.

Owns the write path of a single node: proposals are queued and group-committed by
one writer task (all proposals that arrive while an fdatasync is in flight go into
the next write, with one fdatasync), then applied in index order on the event loop
and answered. Every entry has term 1. The state machine is rebuilt on `start` from
the latest snapshot plus the WAL suffix, and a snapshot is taken when
`kmsd.log.base.SnapshotPolicy` says (at least `snapshot_every` entries, and as many
bytes of commands as the last snapshot had; frozen on the loop between applies,
encoded and written on the snapshot thread while commands go on committing), after
which the WAL segments it covers are deleted.

Files under `data_dir`: `wal/` (kmsd.storage.wal) and `snap/` (kmsd.storage.snapshots).

Fail-stop: an I/O error, or an exception from the state machine (a bug), stops the
log for good. Pending and later proposals fail with UnavailableError, `failure`
holds the cause and `on_fatal` is called once; nothing is retried, because a retried
fsync can claim success for data the kernel already dropped.

Threads: WAL I/O runs on one dedicated thread, snapshot encoding and writes on
another; the state machine and all bookkeeping stay on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kms.raft.v1 import wal_pb2

from kmsd.errors import StorageCorruptedError, UnavailableError
from kmsd.log.base import (
    Applied,
    BeforeCompaction,
    SnapshotPolicy,
    StateMachine,
    collect_politely,
)
from kmsd.storage._fsutil import Syncer
from kmsd.storage.snapshots import Snapshot, SnapshotStore
from kmsd.storage.wal import DEFAULT_SEGMENT_BYTES, RecoveredState, TailRepair, Wal

_log = logging.getLogger(__name__)

TERM = 1
"""The term of every entry a single node writes."""

DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Command bytes one group commit takes at most (it always takes at least one)."""


class _State(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class _Proposal:
    command: bytes
    future: asyncio.Future[Applied]


@dataclass
class _Recovered:
    store: SnapshotStore
    snapshot: Snapshot | None
    wal: Wal
    state: RecoveredState


class SingleNodeLog:
    """A `CommandLog` for one node; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        state_machine: StateMachine,
        *,
        snapshot_every: int = 10_000,
        on_fatal: Callable[[BaseException], None] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        datasync: Syncer = os.fdatasync,
        snapshot_fsync: Syncer = os.fsync,
        before_compaction: BeforeCompaction | None = None,
    ) -> None:
        """`datasync` and `snapshot_fsync` make WAL and snapshot files durable; they are
        seams for tests (count or fail syncs) and default to the real system calls.
        `before_compaction` runs before each snapshot (see `kmsd.log.base`)."""
        self._before_compaction = before_compaction
        self._data_dir = data_dir
        self._sm = state_machine
        self._snapshots = SnapshotPolicy(snapshot_every)
        self._on_fatal = on_fatal
        self._segment_bytes = segment_bytes
        self._max_batch_bytes = max_batch_bytes
        self._datasync = datasync
        self._snapshot_fsync = snapshot_fsync

        self._state = _State.NEW
        self._failure: BaseException | None = None
        self._failure_message = ""
        self._queue: deque[_Proposal] = deque()
        self._inflight: list[_Proposal] = []
        self._wakeup = asyncio.Event()
        # One thread each, so WAL writes stay ordered and a slow snapshot write never
        # delays a group commit.
        self._wal_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmsd-wal")
        self._snap_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmsd-snapshot")
        self._wal: Wal | None = None
        self._store: SnapshotStore | None = None
        self._writer: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._tail_repair: TailRepair | None = None
        self._last_index = 0
        self._applied_index = 0
        self._snapshot_index = 0
        self._compact_to: int | None = None
        self._released = False

    # -- CommandLog ---------------------------------------------------------------

    async def start(self) -> None:
        """Recovers (snapshot, then WAL replay through `apply`) and starts the writer.

        Raises StorageCorruptedError for damaged storage, OSError for I/O failures,
        and whatever `restore`/`apply` raise; the log is then stopped.
        """
        if self._state is not _State.NEW:
            raise RuntimeError("start() may only be called once")
        self._state = _State.STARTING
        loop = asyncio.get_running_loop()
        try:
            recovered = await loop.run_in_executor(self._wal_io, self._open_storage)
            self._wal, self._store = recovered.wal, recovered.store
            self._tail_repair = recovered.state.repair
            self._recover(recovered)
        except BaseException:
            await self._release()
            self._state = _State.STOPPED
            raise
        self._state = _State.RUNNING
        self._writer = asyncio.create_task(self._write_loop(), name="kmsd-log-writer")

    async def stop(self) -> None:
        """Stops accepting proposals, fails queued ones with UnavailableError, lets an
        in-flight write finish (its entries are durable, so they are applied and
        answered) and closes the files. Idempotent."""
        if self._state is _State.STARTING:
            raise RuntimeError("stop() called while start() is running")
        if self._state is _State.NEW:
            self._state = _State.STOPPED
            await self._release()
            return
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def propose(self, command: bytes) -> Applied:
        """Queues `command`; returns once it is fsynced and applied.

        Cancelling the wait withdraws the command only if it has not been written yet.
        Raises UnavailableError when the log is not running or has failed.
        """
        self._check_running()
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._queue.append(_Proposal(command, future))
        self._wakeup.set()
        return await future

    async def read_barrier(self, allow_stale_s: float = 0.0) -> int:
        """The applied index. Every acknowledged proposal was applied before its answer,
        so reading the state machine now is linearizable (staleness never arises)."""
        del allow_stale_s
        self._check_running()
        return self._applied_index

    async def wait_applied(self, index: int, timeout: float | None = None) -> None:
        """Returns at once: everything this log committed is applied. An index beyond
        it was not issued by this log, and waiting would not bring it."""
        del index, timeout
        self._check_running()

    def fresh_within(self, seconds: float) -> bool:
        """Always True: every committed command is applied before it is acknowledged."""
        del seconds
        return self._failure is None

    def is_leader(self) -> bool:
        """Always True: a single node leads itself."""
        return True

    @property
    def failure(self) -> BaseException | None:
        """The fatal error that stopped the log, if any."""
        return self._failure

    # -- Introspection --------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """The index of the last entry applied to the state machine."""
        return self._applied_index

    @property
    def snapshot_index(self) -> int:
        """The index of the latest durable snapshot (0 if none)."""
        return self._snapshot_index

    @property
    def tail_repair(self) -> TailRepair | None:
        """The torn WAL tail cut off during `start`, if there was one."""
        return self._tail_repair

    # -- Recovery -------------------------------------------------------------------

    def _open_storage(self) -> _Recovered:
        """Runs on the WAL thread: loads the snapshot, opens the WAL, checks they fit."""
        store = SnapshotStore.open(self._data_dir / "snap", fsync=self._snapshot_fsync)
        for path in store.removed_tmp:
            _log.warning("deleted interrupted snapshot write %s", path)
        snapshot = store.load_latest()
        snap_index = snapshot.index if snapshot is not None else 0
        wal, state = Wal.open(
            self._data_dir / "wal",
            first_index=snap_index + 1,
            segment_bytes=self._segment_bytes,
            datasync=self._datasync,
        )
        try:
            self._check_fit(snap_index, wal, state)
        except BaseException:
            wal.close()
            raise
        if state.repair is not None:
            r = state.repair
            _log.warning(
                "WAL torn tail repaired (%s): cut %d bytes at offset %d of %s; copy kept at %s",
                r.reason,
                r.cut_bytes,
                r.offset,
                r.segment,
                r.broken_copy,
            )
        return _Recovered(store, snapshot, wal, state)

    def _check_fit(self, snap_index: int, wal: Wal, state: RecoveredState) -> None:
        where = self._data_dir
        if wal.last_index < snap_index:
            # Entries are durable before they are applied and snapshotted, so a WAL that
            # ends before the snapshot has lost acknowledged entries.
            raise StorageCorruptedError(
                f"refusing to start: the snapshot in {where} covers index {snap_index} but "
                f"the WAL ends at index {wal.last_index}; restore this node from a backup "
                "or re-add it under a new id"
            )
        if wal.last_index > snap_index:
            first = state.entries[0].index if state.entries else wal.last_index + 1
            if first > snap_index + 1:
                raise StorageCorruptedError(
                    f"refusing to start: entries {snap_index + 1}..{first - 1} are in neither "
                    f"the snapshot nor the WAL in {where}; restore this node from a backup "
                    "or re-add it under a new id"
                )

    def _recover(self, recovered: _Recovered) -> None:
        """Runs on the loop: restores the state machine and replays the WAL suffix."""
        snap_index = 0
        if recovered.snapshot is not None:
            self._sm.restore(recovered.snapshot.data)
            snap_index = recovered.snapshot.index
        for entry in recovered.state.entries:
            if entry.index <= snap_index:
                continue
            if entry.type == wal_pb2.ENTRY_TYPE_NORMAL:
                self._sm.apply(entry.index, entry.data)
            elif entry.type != wal_pb2.ENTRY_TYPE_NOOP:
                raise StorageCorruptedError(
                    f"refusing to start: WAL entry {entry.index} has type {entry.type}, "
                    "which a single-node log cannot apply"
                )
        self._snapshot_index = snap_index
        self._last_index = recovered.wal.last_index
        self._applied_index = self._last_index

    # -- Writing --------------------------------------------------------------------

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._failure is None:
                if self._compact_to is not None:
                    upto, self._compact_to = self._compact_to, None
                    await loop.run_in_executor(self._wal_io, self._compact, upto)
                    continue
                batch = self._take_batch()
                if batch:
                    await self._commit(batch)
                    continue
                if self._state is not _State.RUNNING and self._snapshot_task is None:
                    # Stopping: a snapshot still being written will want its compaction.
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
        except Exception as exc:
            self._fail(exc, f"{type(exc).__name__}: {exc}")

    def _take_batch(self) -> list[_Proposal]:
        batch: list[_Proposal] = []
        size = 0
        while self._queue:
            proposal = self._queue[0]
            if proposal.future.done():
                # The proposer gave up before the command was written: drop it.
                self._queue.popleft()
                continue
            if batch and size + len(proposal.command) > self._max_batch_bytes:
                break
            self._queue.popleft()
            batch.append(proposal)
            size += len(proposal.command)
        return batch

    async def _commit(self, batch: list[_Proposal]) -> None:
        """Writes `batch` with one fdatasync, then applies and answers it in order."""
        first = self._last_index + 1
        records = [
            wal_pb2.WalRecord(
                entry=wal_pb2.Entry(
                    index=first + offset,
                    term=TERM,
                    type=wal_pb2.ENTRY_TYPE_NORMAL,
                    data=proposal.command,
                )
            )
            for offset, proposal in enumerate(batch)
        ]
        self._inflight = batch
        await asyncio.get_running_loop().run_in_executor(self._wal_io, self._write, records)
        self._last_index = first + len(batch) - 1
        if self._failure is not None:
            # A snapshot write failed meanwhile; a stopped log applies nothing more.
            return
        for offset, proposal in enumerate(batch):
            index = first + offset
            try:
                result = self._sm.apply(index, proposal.command)
            except Exception as exc:
                self._fail(exc, f"state machine apply of index {index} raised {type(exc).__name__}")
                return
            self._applied_index = index
            self._snapshots.applied(len(proposal.command))
            if not proposal.future.done():
                proposal.future.set_result(Applied(index, result))
        self._inflight = []
        self._maybe_snapshot()

    def _write(self, records: list[wal_pb2.WalRecord]) -> None:
        """Runs on the WAL thread."""
        assert self._wal is not None
        self._wal.append(records)
        self._wal.sync()

    # -- Snapshots ------------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        if self._state is not _State.RUNNING or self._snapshot_task is not None:
            return
        if not self._snapshots.due(self._applied_index - self._snapshot_index):
            return
        if not self._snapshots.settled(self._before_compaction):
            return
        index = self._applied_index
        # Frozen here, between applies, so the bytes match exactly `index`; encoded and
        # written on the snapshot thread while commands go on committing.
        frozen = self._sm.freeze()
        self._snapshots.started()
        self._snapshot_task = asyncio.create_task(
            self._save_snapshot(index, frozen), name="kmsd-log-snapshot"
        )

    async def _save_snapshot(self, index: int, frozen: Iterator[bytes]) -> None:
        assert self._store is not None
        store = self._store

        def encode_and_save() -> int:
            data = b"".join(collect_politely(frozen))
            store.save(index, TERM, data)
            return len(data)

        try:
            size = await asyncio.get_running_loop().run_in_executor(self._snap_io, encode_and_save)
        except Exception as exc:
            self._fail(exc, f"snapshot write failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._snapshot_task = None
        self._snapshots.finished(size)
        self._snapshot_index = index
        # The writer compacts between rounds: only it touches the WAL.
        self._compact_to = index
        self._wakeup.set()

    def _compact(self, upto: int) -> None:
        """Runs on the WAL thread, only after the snapshot at `upto` is durable."""
        assert self._wal is not None
        marker = wal_pb2.SnapshotMarker(index=upto, term=TERM)
        self._wal.append([wal_pb2.WalRecord(snapshot=marker)])
        removed = self._wal.compact(upto)
        if removed:
            _log.info("WAL compacted up to index %d: removed %d segment(s)", upto, len(removed))

    # -- Failure and shutdown -------------------------------------------------------

    def _check_running(self) -> None:
        if self._failure is not None:
            raise UnavailableError(self._failure_message)
        if self._state is not _State.RUNNING:
            raise UnavailableError(f"log is {self._state.value}, not accepting proposals")

    def _fail(self, exc: BaseException, why: str) -> None:
        """Fail-stop. `why` must never contain command bytes."""
        if self._failure is not None:
            return
        self._failure = exc
        self._failure_message = f"log failed: {why}"
        self._state = _State.FAILED
        _log.critical("command log stopped: %s", why)
        self._fail_proposals([*self._inflight, *self._queue], self._failure_message)
        self._inflight = []
        self._queue.clear()
        self._wakeup.set()
        if self._on_fatal is not None:
            try:
                self._on_fatal(exc)
            except Exception:
                _log.exception("on_fatal callback raised")

    @staticmethod
    def _fail_proposals(proposals: list[_Proposal], message: str) -> None:
        for proposal in proposals:
            if not proposal.future.done():
                proposal.future.set_exception(UnavailableError(message))

    async def _stop(self) -> None:
        if self._state is _State.RUNNING:
            self._state = _State.STOPPING
        self._fail_proposals(list(self._queue), "log stopped")
        self._queue.clear()
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        if self._snapshot_task is not None:
            await self._snapshot_task
        await self._release()
        if self._state is _State.STOPPING:
            self._state = _State.STOPPED

    async def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._wal is not None:
            await asyncio.get_running_loop().run_in_executor(self._wal_io, self._wal.close)
        self._wal_io.shutdown(wait=True)
        self._snap_io.shutdown(wait=True)
