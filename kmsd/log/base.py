"""The seam between the key store and the log that orders and persists its commands.

The state machine (`kmsd.fsm`) never knows whether its log is a single node's WAL
or a replicated Raft log: both implement `CommandLog` and feed committed commands,
in order, to a `StateMachine`. A command is opaque bytes here (a serialized
`kms.fsm.v1.Command`).

Contract, for every implementation:
- `propose` returns only after the command is durable (fsynced; for Raft, on a
  majority) *and* applied; the returned `Applied.result` is what `apply` returned.
- Commands are applied one at a time, in log order, exactly once per process
  lifetime; after a restart the state is rebuilt from the latest snapshot plus
  the log suffix, so `apply` must be deterministic.
- A failure to persist is fatal (fail-stop): the log stops, pending and later
  proposals fail with `UnavailableError`, and `failure` says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class StateMachine(Protocol):
    """What a log drives. Implemented by `kmsd.fsm.KeyStore`."""

    def apply(self, index: int, command: bytes) -> object:
        """Applies one committed command. Deterministic; never raises for bad commands
        (a rejected command is a result value). `index` is the log index, > 0."""
        ...

    def snapshot(self) -> bytes:
        """Serializes the whole state, including the index of the last applied command."""
        ...

    def freeze(self) -> Iterator[bytes]:
        """The state as of now, cheaply: the bytes `snapshot` would return now, as chunks
        made lazily. Logs call it between applies and consume it on another thread (see
        `collect_politely`) while they go on applying, so a snapshot never stops the event
        loop for long."""
        ...

    def restore(self, data: bytes) -> None:
        """Replaces the whole state with a snapshot made by `snapshot`."""
        ...

    @property
    def applied_index(self) -> int:
        """The index of the last command applied (or restored from a snapshot); 0 if none."""
        ...


_log = logging.getLogger(__name__)

_POSTPONED_LOG_EVERY_S = 10.0

BeforeCompaction = Callable[[], None]
"""Called on the loop before a snapshot lets a log discard applied entries: makes
durable whatever was derived from them and could otherwise only be rebuilt from them
(the audit records of logged mutations, `kmsd.audit.logged`). Raises if it cannot."""


def collect_politely(chunks: Iterable[bytes], slice_s: float = 0.0001) -> list[bytes]:
    """Collects `chunks` on a worker thread, giving the GIL away after every `slice_s`
    of work.

    A thread that computes holds the GIL for the whole switch interval (5 ms) each time
    it gets it, and the event loop, which lets go of it at every system call, has to
    wait that long to get it back every time: encoding a large snapshot that way
    slowed a node's loop several-fold for as long as it took. Letting go every 0.1 ms
    keeps its waits that short; the snapshot takes the time the loop leaves it. (By
    time, not by count: a chunk may be a fresh encoding or a reused one, and a GIL
    hand-off per few cheap chunks would cost more than the chunks.)"""
    parts: list[bytes] = []
    clock = time.perf_counter
    due = clock() + slice_s
    for chunk in chunks:
        parts.append(chunk)
        if clock() >= due:
            time.sleep(0)  # releases the GIL; a waiting thread takes it
            due = clock() + slice_s
    return parts


class SnapshotPolicy:
    """When a log snapshots its state machine: once `every` commands were applied since
    the last snapshot *and* they add up to at least that snapshot's size in bytes.

    A snapshot serializes the whole state (on a thread, but holding the GIL), so its
    cost grows with the store; a fixed interval makes the cost per command grow with it
    too. Waiting until the log since the last snapshot is as large as the snapshot
    keeps the snapshot work per byte written constant, and the log to keep in memory
    and replay at start at most about as large as the state."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.every = every
        self._bytes_since = 0
        self._last_size = 0
        self._postponed_logged = -_POSTPONED_LOG_EVERY_S

    def applied(self, command_bytes: int) -> None:
        self._bytes_since += command_bytes

    def due(self, commands_since: int) -> bool:
        return commands_since >= self.every and self._bytes_since >= self._last_size

    def started(self) -> None:
        """A snapshot of everything applied so far is being made."""
        self._bytes_since = 0

    def finished(self, snapshot_bytes: int) -> None:
        """The snapshot started last came out this large."""
        self._last_size = snapshot_bytes

    def taken(self, snapshot_bytes: int) -> None:
        """A snapshot of this size now covers everything applied."""
        self.started()
        self.finished(snapshot_bytes)

    def settled(self, before: BeforeCompaction | None) -> bool:
        """Runs `before` ahead of a snapshot of the log's own; False (try again later)
        if it raised. Said in the log at most every `_POSTPONED_LOG_EVERY_S`: a log asks
        after every batch it applies."""
        if before is None:
            return True
        try:
            before()
        except Exception as error:
            now = time.monotonic()
            if now - self._postponed_logged >= _POSTPONED_LOG_EVERY_S:
                self._postponed_logged = now
                _log.warning("snapshot postponed: %s", error)
            return False
        return True


@dataclass(frozen=True)
class Applied:
    """The outcome of a proposal: where it sits in the log and what `apply` returned."""

    index: int
    result: object


class CommandLog(Protocol):
    """An ordered, durable log of commands applied to one state machine."""

    async def start(self) -> None:
        """Recovers state (snapshot + log replay) and begins accepting proposals."""
        ...

    async def stop(self) -> None:
        """Stops accepting proposals; pending ones fail with UnavailableError."""
        ...

    async def propose(self, command: bytes) -> Applied:
        """Appends `command`; returns once it is durable and applied."""
        ...

    async def read_barrier(self, allow_stale_s: float = 0.0) -> int:
        """Returns an index such that reading the state machine after it is applied
        is linearizable; returns only once that index is applied locally. With
        `allow_stale_s` > 0 a replica that heard from its leader within that many
        seconds may answer from its applied state without a round trip."""
        ...

    async def wait_applied(self, index: int, timeout: float | None = None) -> None:
        """Returns once `index` is applied locally (read-your-writes); raises
        UnavailableError if that does not happen within the timeout."""
        ...

    def is_leader(self) -> bool:
        """True when this node may propose (always true for a single node)."""
        ...

    def fresh_within(self, seconds: float) -> bool:
        """True when this node's applied state may serve a bounded-staleness read now:
        it heard from its leader (a leader: from a quorum) within `seconds`. Always
        true for a single node."""
        ...

    @property
    def applied_index(self) -> int:
        """The index of the last command applied on this node."""
        ...

    @property
    def failure(self) -> BaseException | None:
        """The fatal error that stopped the log, if any."""
        ...
