"""`AuditWriter`: appends audit records durably, with group commit and rotation.

A caller `await writer.record(event)` and gets control back once the record is
durable. On the event loop, `submit` stamps the record (seq, time, prev), encodes
and hashes it and queues the line, so records are chained in submission order;
once per turn of the loop, everything queued is appended with one `write` (to the
page cache: cheap, on the loop). A sync thread then makes it durable: whenever
records were written since its last fsync, it runs one fdatasync for all of them
and tells the loop up to which record the file is durable. Records written while
an fsync runs are covered by the next one (group commit: one fsync per batch of
concurrent requests), and a busy sync thread is never woken per record. Under load
(records arrived during the last fsync, or right after it) the sync thread also lets a batch grow
while records keep coming, for at most `gather_max_s` (5 ms) after the previous
fsync started: each fsync and thread hand-off costs far more CPU than a record.

Files: `audit-<16 hex seq of first record>.jsonl` in one directory (mode 0700,
files 0600). Before a write, a file that has reached `max_file_bytes` is synced
and closed and the next one created (named after the first seq written to it; the
directory is synced), so a file is at most one write over the limit, and the chain
runs on across files.

Fail closed: if a write, an fsync or a rotation fails, every record not yet
durable fails with AuditUnavailable, and so does every `submit` until the log is
writable again (`available` is False meanwhile; the node refuses requests). A
recovery task retries every `retry_interval_s`: it cuts the current file back to
its last acknowledged record (what follows belongs to requests that were refused;
the bytes are kept in `<file>.broken`), syncs, opens a fresh file, and writes a
recovery record naming what was cut. A failed fsync is never retried on the same
data.

Restart: the chain continues from the newest file's last valid record. Bytes
after it (a write torn by a crash: an incomplete line, zeros, a garbled record)
are copied to `<file>.broken`, cut off, and named by a recovery record; damage
anywhere else is left for `kmsctl audit verify` to report.

Log-backed records (`submit_logged`): the record of a mutation that the command log
made durable, written when the command is applied. Nobody waits for it: the log
entry it is made from is durable already, and `kmsd.audit.logged` writes it again
from the log if it is lost (`logged_watermark`, read at start, says up to which log
index this node's records are in the chain). So its fsync waits for company (the
next record someone waits for, or at most a second or 1024 such records), and a write
or fsync failure does not refuse it: it is written again after recovery. `settle`
makes everything submitted durable at once, before a snapshot lets the log forget the
entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms_client.audit_verify import GENESIS, audit_files, file_name, file_seq, parse_record
from kmsd.audit.record import AuditEvent, encode, recovery_event
from kmsd.clock import Clock, SystemClock
from kmsd.errors import StorageCorruptedError, UnavailableError
from kmsd.storage._fsutil import Syncer, fsync_dir, unused_path, write_all, write_durable_file

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
_TAIL_WINDOW = 256 * 1024
"""Bytes read from a file's end to find its last valid record (doubled until found)."""


class AuditUnavailable(UnavailableError):
    """The audit log cannot be written: the request is refused (fail closed)."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"the audit log cannot be written ({cause}); requests are refused until it is",
            retry_after_seconds=1.0,
        )


@dataclass(frozen=True)
class Cut:
    """Audit bytes cut off a file: a torn tail at start, or unacknowledged records."""

    file: str
    offset: int
    cut_bytes: int
    sha256: str
    broken_copy: str
    reason: str

    def detail(self, event: str, **more: Any) -> dict[str, Any]:
        return {
            "event": event,
            "file": self.file,
            "offset": self.offset,
            "cut_bytes": self.cut_bytes,
            "cut_sha256": self.sha256,
            "broken_copy": self.broken_copy,
            "reason": self.reason,
            **more,
        }


@dataclass
class _Tail:
    """Where the chain ends on disk."""

    path: Path
    offset: int
    last_seq: int
    last_hash: str
    cut: Cut | None


def _lines_from_end(path: Path) -> Iterator[tuple[int, bytes]]:
    """The newline-ended lines of `path` (without their newline), last first, each with
    the offset just past it; bytes after the last newline are no line. Reads from the
    end in windows that double, so what is found near the end costs little."""
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        window = _TAIL_WINDOW
        terminated = False  # whether `end` is just past a newline
        while end > 0:
            start = max(0, end - window)
            fh.seek(start)
            data = fh.read(end - start)
            window *= 2
            if not terminated:
                last = data.rfind(b"\n")
                if last < 0:
                    if start == 0:
                        return
                    continue
                data = data[: last + 1]
                end, terminated = start + last + 1, True
            # The window's first line is whole only if the window starts the file.
            first = 0 if start == 0 else data.find(b"\n") + 1
            if first == len(data):
                continue  # one line, perhaps begun before the window: widen it
            stop = end
            for line in reversed(data[first:-1].split(b"\n")):
                yield stop, line
                stop -= len(line) + 1
            end = start + first


def _last_valid(path: Path) -> tuple[int, dict[str, Any] | None, int]:
    """(end offset of the file's last valid record, that record or None, how many
    complete but invalid lines follow it)."""
    invalid = 0
    for end, line in _lines_from_end(path):
        record, why = parse_record(line)
        if not why:
            return end, record, invalid
        invalid += 1
    return 0, None, invalid


def _cut(path: Path, offset: int, reason: str) -> Cut:
    """Saves path[offset:] to `<path>.broken` durably, then truncates `path` (the
    caller syncs it)."""
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    broken = unused_path(path.with_name(path.name + ".broken"))
    write_durable_file(broken, [data], os.fsync)
    fsync_dir(path.parent)
    os.truncate(path, offset)
    return Cut(path.name, offset, len(data), hashlib.sha256(data).hexdigest(), broken.name, reason)


def _sync_path(path: Path, syncer: Syncer) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        syncer(fd)
    finally:
        os.close(fd)


def recover_tail(directory: Path, syncer: Syncer) -> _Tail:
    """Finds the end of the chain in `directory` (creating nothing); cuts a torn tail."""
    files = audit_files(directory)
    if not files:
        return _Tail(directory / file_name(1), 0, 0, GENESIS, None)
    newest = files[-1]
    end, record, after = _last_valid(newest)
    size = newest.stat().st_size
    cut = None
    if end < size:
        if record is None and after == 0:
            reason = "an incomplete first line"
        elif after == 0:
            reason = "an incomplete last line"
        else:
            reason = f"{after} invalid line(s) at the end"
        cut = _cut(newest, end, reason)
        _sync_path(newest, syncer)
        log.warning(
            "audit: cut %d bytes (%s) off %s at offset %d; saved in %s",
            cut.cut_bytes,
            reason,
            newest,
            end,
            cut.broken_copy,
        )
    if record is not None:
        return _Tail(newest, end, record["seq"], record["hash"], cut)
    promised = file_seq(newest.name) or 1
    if len(files) == 1:
        if promised != 1:
            raise StorageCorruptedError(
                f"audit: {newest} holds no valid record and no earlier audit file is left, so"
                f" the chain cannot continue at seq {promised}; move the file aside"
            )
        return _Tail(newest, 0, 0, GENESIS, cut)
    before = files[-2]
    before_end, before_record, _ = _last_valid(before)
    if before_record is None or before_end != before.stat().st_size:
        raise StorageCorruptedError(
            f"audit: {before} does not end with a valid record; check it with `kmsctl audit verify`"
        )
    if before_record["seq"] + 1 != promised:
        raise StorageCorruptedError(
            f"audit: {before} ends at seq {before_record['seq']} but {newest.name} starts at"
            f" seq {promised}"
        )
    return _Tail(newest, 0, before_record["seq"], before_record["hash"], cut)


@dataclass(slots=True)
class _Pending:
    line: bytes
    seq: int
    hash: str
    future: asyncio.Future[None] | None
    logged: AuditEvent | None = None
    """The event of a log-backed record (kept to write it again after a failure)."""
    log_index: int = 0


_LOG_INDEX = b'"log_index":'


def last_logged_index(directory: Path, node_id: int) -> int:
    """The `detail.log_index` of node `node_id`'s last log-backed record in the chain
    (searched from the newest file back), or 0. (Log order is chain order, so it is the
    highest one, unless the command log was reset since: then it is the new log's.)"""
    for path in reversed(audit_files(directory)):
        for _, line in _lines_from_end(path):
            if _LOG_INDEX not in line:
                continue
            record, why = parse_record(line)
            detail = record.get("detail") if record is not None and not why else None
            if (
                record is not None
                and record.get("node") == node_id
                and isinstance(detail, dict)
                and isinstance(detail.get("log_index"), int)
            ):
                return int(detail["log_index"])
    return 0


class AuditWriter:
    """The audit log of one node; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        node_id: int,
        *,
        clock: Clock | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        fsync: bool = True,
        syncer: Syncer = os.fdatasync,
        retry_interval_s: float = 1.0,
        on_availability: Callable[[bool], None] | None = None,
        gather_max_s: float = 0.005,
        gather_slice_s: float = 0.0003,
        inline_sync: bool = True,
        logged_sync_interval_s: float = 1.0,
        logged_sync_records: int = 1024,
    ) -> None:
        """`syncer` makes a file's data durable (a seam for tests: count or fail syncs);
        with `fsync` False nothing is synced (records survive a process crash, not a
        power loss). `on_availability` is told when the log stops and starts taking
        records. Under load an fsync waits up to `gather_max_s` after the previous
        one started, while every `gather_slice_s` brings more records (0: never).
        With `inline_sync` a lone record is synced on the event loop (`_sync_inline`).
        Log-backed records alone are synced within `logged_sync_interval_s` or once
        `logged_sync_records` wait (`_defer_sync`)."""
        if max_file_bytes < 1:
            raise ValueError("max_file_bytes must be >= 1")
        self._dir = directory
        self._node = node_id
        self._clock = clock or SystemClock()
        self._max_file_bytes = max_file_bytes
        self._sync: Syncer | None = syncer if fsync else None
        self._retry_interval_s = retry_interval_s
        self._gather_max_s = gather_max_s
        self._gather_slice_s = gather_slice_s
        self._inline_sync = inline_sync
        self._on_availability = on_availability
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._failure: str | None = None
        self._refused = 0
        self._recovery: asyncio.Task[None] | None = None
        # The chain as submitted, and the records on their way (event loop only).
        self._next_seq = 1
        self._prev = GENESIS
        self._unwritten: list[_Pending] = []
        self._write_scheduled = False
        self._waiting: deque[_Pending] = deque()
        # The file. The loop writes it; the sync thread reads `_fd`, `_gen` and
        # `_written` and syncs while holding `_fd_lock`, which rotation and recovery
        # take before they replace the file.
        self._fd = -1
        self._path = directory / file_name(1)
        self._gen = 0
        self._written: tuple[int, str, int] = (0, GENESIS, 0)
        """(seq, hash) of the last record written, and the file's size after it."""
        self._durable_seq = 0
        self._durable_hash = GENESIS
        self._durable_offset = 0
        self._fd_lock = threading.Lock()
        self._synced_seq = 0
        self.calls_in_flight = 0
        """Requests being served whose records will come here (kept by the API's hook)."""
        self._wakeup = threading.Event()
        self._running = False
        self._poisoned = False
        self._thread: threading.Thread | None = None
        self._failure_cut: Cut | None = None
        # Log-backed records a failure cut off (or that came during it), to write again.
        self._requeue: list[tuple[AuditEvent, int]] = []
        self._logged_dropped = False
        self._logged_sync_interval_s = logged_sync_interval_s
        self._logged_sync_records = logged_sync_records
        self._logged_unsynced = 0
        self._lazy_sync: asyncio.TimerHandle | None = None
        self.logged_watermark = 0
        """The log index of this node's last log-backed record in the chain at start."""
        self.batches = 0
        """Writes of a group of records (each made durable by one fsync or less)."""
        self.syncs = 0
        self._records = 0
        self.start_cut: Cut | None = None

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Finds the chain's end (cutting a torn tail), opens the newest file, and, if
        bytes were cut, writes a recovery record saying so before returning."""
        if self._started:
            raise RuntimeError("start() may only be called once")
        self._started = True
        self._loop = loop = asyncio.get_running_loop()
        tail = await loop.run_in_executor(None, self._open_tail)
        self.logged_watermark = await loop.run_in_executor(
            None, last_logged_index, self._dir, self._node
        )
        self._next_seq, self._prev = tail.last_seq + 1, tail.last_hash
        self._written = (tail.last_seq, tail.last_hash, tail.offset)
        self._durable_seq, self._durable_hash = tail.last_seq, tail.last_hash
        self._durable_offset, self._synced_seq = tail.offset, tail.last_seq
        self.start_cut = tail.cut
        if self._sync is not None:
            self._running = True
            self._thread = threading.Thread(
                target=self._sync_loop, name="kmsd-audit-sync", daemon=True
            )
            self._thread.start()
        if tail.cut is not None:
            await self.record(recovery_event(tail.cut.detail("torn_tail_cut")))

    def _open_tail(self) -> _Tail:
        if not self._dir.is_dir():
            self._dir.mkdir(mode=0o700, parents=True)
            fsync_dir(self._dir.parent)
        tail = recover_tail(self._dir, self._sync or (lambda fd: None))
        self._open(tail.path)
        return tail

    def _open(self, path: Path) -> None:
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if not existed:
                fsync_dir(self._dir)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._path = fd, path

    async def stop(self) -> None:
        """Writes what is queued, syncs and closes the file."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        if self._lazy_sync is not None:
            self._lazy_sync.cancel()  # the final sync below covers those records
            self._lazy_sync = None
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._unwritten:
            self._write_batch()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            self._running = False
            self._wakeup.set()
            await loop.run_in_executor(None, self._thread.join)
        try:
            await loop.run_in_executor(None, self._close)
        except OSError as error:
            self._fail(f"{type(error).__name__}: {error}", [])
        # The final sync made every record written durable.
        self._resolve(self._written[0])
        log.info(
            "audit: closed at seq %d (%d records in %d writes, %d fsyncs, since start)",
            self._written[0],
            self._records,
            self.batches,
            self.syncs,
        )

    def _close(self) -> None:
        with self._fd_lock:
            if self._fd < 0:
                return
            try:
                if self._sync is not None and self._failure is None:
                    self._sync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    # -- recording -------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while records cannot be written (requests must be refused)."""
        return self._failure is None and not self._closed

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def directory(self) -> Path:
        return self._dir

    def unavailable_error(self) -> AuditUnavailable:
        return AuditUnavailable(self._failure or "the audit log is closed")

    def submit(self, event: AuditEvent) -> asyncio.Future[None]:
        """Chains and queues a record; the future completes once it is durable (or
        fails with AuditUnavailable). Raises AuditUnavailable at once if the log is
        not writable."""
        if not self.available or self._loop is None:
            raise self.unavailable_error()
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue(event, future)
        return future

    def submit_logged(self, event: AuditEvent, log_index: int) -> None:
        """Chains and queues the record of the mutation at `log_index`, which the command
        log made durable: nobody waits for it. While the log cannot be written it is
        kept and written after recovery; once closed it is dropped (the next start
        writes it from the command log)."""
        if self._closed or self._loop is None:
            self._logged_dropped = True
        elif self._failure is not None:
            self._requeue.append((event, log_index))
        else:
            self._queue(event, None, log_index)

    def _queue(
        self, event: AuditEvent, future: asyncio.Future[None] | None, log_index: int = 0
    ) -> None:
        """Chains `event`; `log_index` (from 1) marks the record of a logged mutation."""
        assert self._loop is not None
        logged = event if log_index else None
        seq = self._next_seq
        line, digest = encode(
            event, seq=seq, time_ms=self._clock.now_ms(), node=self._node, prev=self._prev
        )
        self._next_seq, self._prev = seq + 1, digest
        self._unwritten.append(_Pending(line, seq, digest, future, logged, log_index))
        if not self._write_scheduled:
            # One write for all the records submitted in this turn of the loop.
            self._write_scheduled = True
            self._loop.call_soon(self._write_batch)

    def settle(self) -> None:
        """On the loop: makes every record submitted so far durable now (write and
        fdatasync here). Raises AuditUnavailable if a log-backed record cannot be made
        durable now (the log is failed or closed): the command log must then keep the
        entries it would be written from."""
        if self._unwritten:
            self._write_batch()  # a failure here moves its log-backed records to _requeue
        if self._requeue or self._logged_dropped:
            raise self.unavailable_error()
        if self._failure is not None or self._closed:
            return  # nothing log-backed is waiting (a failure requeues them all)
        if self._sync is None:
            return
        with self._fd_lock:  # a sync in progress on the thread finishes first
            gen = self._gen
            seq, _, offset = self._written
            if seq > self._synced_seq and self._fd >= 0 and not self._sync_held():
                raise self.unavailable_error()
        self._synced(gen, seq, offset)

    async def record(self, event: AuditEvent) -> None:
        """Records `event`; returns once it is durable. Raises AuditUnavailable."""
        await self.submit(event)

    def _write_batch(self) -> None:
        """On the loop: append the queued records (to the page cache: no fsync here),
        then let the sync thread make them durable."""
        self._write_scheduled = False
        batch, self._unwritten = self._unwritten, []
        if not batch or self._failure is not None:
            return
        data = b"".join(p.line for p in batch)
        last = batch[-1]
        try:
            if self._written[2] >= self._max_file_bytes:
                self._rotate(batch[0].seq)
            write_all(self._fd, data)
        except Exception as error:  # OSError, or a bug: either way, fail closed
            self._fail(f"{type(error).__name__}: {error}", batch)
            return
        self.batches += 1
        self._records += len(batch)
        self._written = (last.seq, last.hash, self._written[2] + len(data))
        self._waiting.extend(batch)
        if self._sync is None:
            self._durable_offset = self._written[2]
            self._resolve(last.seq)
        elif all(p.future is None for p in batch):
            self._defer_sync(len(batch))
        elif not self._sync_inline(len(batch)):
            self._wakeup.set()

    def _defer_sync(self, records: int) -> None:
        """Log-backed records only: nobody waits for them, and the command log holds
        them until `settle`, so their fsync can wait for company (another request's
        record, a snapshot's `settle`), at most `logged_sync_interval_s` or
        `logged_sync_records` records: a fsync and two thread hand-offs per write cost
        more than the whole record."""
        assert self._loop is not None
        self._logged_unsynced += records
        if self._logged_unsynced >= self._logged_sync_records:
            self._wakeup.set()
        elif self._lazy_sync is None:
            self._lazy_sync = self._loop.call_later(
                self._logged_sync_interval_s, self._sync_deferred
            )

    def _sync_deferred(self) -> None:
        self._lazy_sync = None
        if self._waiting:
            self._wakeup.set()

    def _sync_inline(self, batch: int) -> bool:
        """Syncs on the loop, now, when this batch is one record and no other call is in
        flight (`calls_in_flight`, kept by the API's audit hook): for a lone caller the
        two thread hand-offs of the sync thread cost more time than the fdatasync
        itself, and nobody else waits for the loop meanwhile. With other calls in flight
        the sync thread syncs, gathering their records. Returns False when it did not."""
        assert self._sync is not None
        if not self._inline_sync or batch != 1 or self.calls_in_flight > 1:
            return False
        if not self._fd_lock.acquire(blocking=False):
            return False  # the sync thread is busy with this file: it will do
        try:
            seq, _, offset = self._written
            if not self._sync_held():
                return True
        finally:
            self._fd_lock.release()
        self._synced(self._gen, seq, offset)
        return True

    def _sync_held(self) -> bool:
        """On the loop, holding `_fd_lock`: syncs the current file up to what is written.
        On failure the log is poisoned and failed; returns False."""
        assert self._sync is not None
        seq = self._written[0]
        try:
            self._sync(self._fd)
        except Exception as error:
            self._poisoned = True
            self._fail(f"{type(error).__name__}: {error}", [])
            return False
        self._synced_seq = seq
        self.syncs += 1
        return True

    def _rotate(self, first_seq: int) -> None:
        """On the loop (rare): sync and close the current file, start the next one."""
        with self._fd_lock:  # waits for a sync in progress on the old file
            if self._sync is not None:
                self._sync(self._fd)
                self.syncs += 1
            os.close(self._fd)
            self._fd = -1
            self._open(self._dir / file_name(first_seq))
            self._gen += 1
            seq, digest, _ = self._written
            self._written = (seq, digest, 0)
            self._synced_seq = seq
        self._durable_offset = 0
        self._resolve(seq)

    def _resolve(self, seq: int) -> None:
        """Records up to `seq` are durable: answer their callers. (Every record written
        waits in `_waiting` until then, so the last one answered is the durable end.)"""
        waiting = self._waiting
        while waiting and waiting[0].seq <= seq:
            pending = waiting.popleft()
            self._durable_seq, self._durable_hash = pending.seq, pending.hash
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(None)

    # -- the sync thread -----------------------------------------------------------------

    def _sync_loop(self) -> None:
        """Syncs the file whenever records were written since the last sync: records
        written while a sync runs are made durable together by the next one. Under
        load (records were written during the last sync, or came right after it), it
        first lets the batch grow while records keep coming: see `_gather`."""
        assert self._sync is not None and self._loop is not None
        busy = False
        last_start = last_end = 0.0
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            # Records coming right after the last fsync are a sign of load, too.
            busy = busy or time.monotonic() - last_end < self._gather_slice_s
            while self._running and not self._poisoned:
                if busy:
                    self._gather(last_start + self._gather_max_s)
                last_start = time.monotonic()
                with self._fd_lock:
                    gen, fd = self._gen, self._fd
                    seq, _, offset = self._written
                    if self._poisoned or seq <= self._synced_seq or fd < 0:
                        break
                    try:
                        self._sync(fd)
                    except Exception as error:
                        self._poisoned = True
                        self._call_loop(self._sync_failed, f"{type(error).__name__}: {error}")
                        break
                    self._synced_seq = seq
                    self.syncs += 1
                    busy = self._written[0] > seq
                last_end = time.monotonic()
                self._call_loop(self._synced, gen, seq, offset)
            if not self._running:
                return

    def _gather(self, deadline: float) -> None:
        """Sync thread: waits, until `deadline` at most, while each `_gather_slice_s`
        brings new records. Under load this makes one fsync cover many requests (each
        fsync and thread hand-off costs far more CPU than a record); it ends at once
        when the callers have all written their records and wait for this fsync."""
        seen = self._written[0]
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self._gather_slice_s, left))
            now_seen = self._written[0]
            if now_seen == seen:
                return
            seen = now_seen

    def _call_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _synced(self, gen: int, seq: int, offset: int) -> None:
        if gen != self._gen or self._failure is not None:
            return  # about a file since replaced: rotation or recovery answered for it
        self._durable_offset = max(self._durable_offset, offset)
        self._resolve(seq)
        if not self._waiting:
            self._logged_unsynced = 0

    def _sync_failed(self, cause: str) -> None:
        self._fail(cause, [])

    # -- fail closed, and recovery -------------------------------------------------------

    def _fail(self, cause: str, batch: list[_Pending]) -> None:
        cut_off = sorted(batch + self._unwritten + list(self._waiting), key=lambda p: p.seq)
        self._unwritten = []
        self._waiting.clear()
        # Log-backed records are written again after recovery, in their order.
        logged = [(p.logged, p.log_index) for p in cut_off if p.logged is not None]
        self._requeue[:0] = logged
        refused = [p for p in cut_off if p.future is not None]
        error = AuditUnavailable(cause)
        for pending in refused:
            assert pending.future is not None
            if not pending.future.done():
                pending.future.set_exception(error)
                # A caller that was cancelled meanwhile never retrieves it.
                pending.future.exception()
        if self._failure is not None:
            self._refused += len(refused)
            return
        self._failure = cause
        self._refused = len(refused)
        self._poisoned = True
        log.critical("audit: the log cannot be written (%s); refusing requests", cause)
        if self._on_availability is not None:
            self._on_availability(False)
        if not self._closed:
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name="kmsd-audit-recover"
            )

    async def _recover(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._retry_interval_s)
            cause = self._failure or ""
            try:
                cut = await loop.run_in_executor(None, self._reopen)
            except Exception as error:
                log.warning("audit: still not writable: %s", error)
                continue
            self._next_seq, self._prev = self._durable_seq + 1, self._durable_hash
            facts = {
                "error": cause,
                "refused_records": self._refused,
                "last_acknowledged_seq": self._durable_seq,
            }
            detail = (
                {"event": "write_failed", **facts}
                if cut is None
                else cut.detail("write_failed", **facts)
            )
            self._failure = None
            recorded = self.submit(recovery_event(detail))
            # Right behind it, before anything newer: log-backed records stay in log order.
            requeued, self._requeue = self._requeue, []
            for event, log_index in requeued:
                self._queue(event, None, log_index)
            try:
                await recorded
            except AuditUnavailable:
                return  # it failed again: _fail has started the next recovery task
            log.warning("audit: the log is writable again; %s", detail)
            self._recovery = None
            if self._on_availability is not None:
                self._on_availability(True)
            return

    def _reopen(self) -> Cut | None:
        """In a worker thread, while the loop writes nothing: cut the current file back
        to its last acknowledged record, then open a fresh file for the next seq (or
        reuse this one if nothing in it was acknowledged)."""
        with self._fd_lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            path, durable_offset = self._path, self._durable_offset
            size = path.stat().st_size if path.exists() else 0
            if size > durable_offset:
                # Kept across attempts: a later attempt may fail after this cut succeeded.
                self._failure_cut = _cut(
                    path,
                    durable_offset,
                    "records of refused requests, written after the last acknowledged one",
                )
            if self._sync is not None and path.exists():
                _sync_path(path, self._sync)
            if durable_offset > 0:
                self._open(self._dir / file_name(self._durable_seq + 1))
            else:
                self._open(path)
            self._gen += 1
            self._written = (self._durable_seq, self._durable_hash, 0)
            self._durable_offset = 0
            self._synced_seq = self._durable_seq
            self._poisoned = False
        cut, self._failure_cut = self._failure_cut, None
        return cut
