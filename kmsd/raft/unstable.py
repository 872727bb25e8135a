"""The not-yet-durable tail of the log: entries and a snapshot the driver has still to persist.

Entries live here from the moment the core appends them until `advance()` confirms
the driver persisted them (`stable_to`); only then are they served from Storage.
`in_progress` marks how far the tail was already handed to the driver in a Ready,
so a later Ready carries only what is new (the core may be stepped while a Ready
is being persisted).

Invariants: entries are dense from `offset`; `offset <= in_progress <= offset + len`;
when `snapshot` is set, `offset == snapshot.meta.index + 1`.
"""

from __future__ import annotations

from .types import Entry, Snapshot


class Unstable:
    """The unstable tail of a RaftLog."""

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.snapshot_in_progress = False
        self.entries: list[Entry] = []
        self.offset = offset
        self.in_progress = offset

    def last_index(self) -> int:
        return self.offset + len(self.entries) - 1

    def term(self, index: int) -> int | None:
        """The term at `index` if the tail knows it, else None."""
        if self.snapshot is not None and index == self.snapshot.meta.index:
            return self.snapshot.meta.term
        if self.offset <= index < self.offset + len(self.entries):
            return self.entries[index - self.offset].term
        return None

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with index in [lo, hi), all of which must be in the tail."""
        return self.entries[lo - self.offset : hi - self.offset]

    def has_unhanded(self) -> bool:
        """Whether something was never handed to the driver yet."""
        pending_snapshot = self.snapshot is not None and not self.snapshot_in_progress
        return pending_snapshot or self.in_progress < self.offset + len(self.entries)

    def hand_snapshot(self) -> Snapshot | None:
        """The snapshot to persist next (once), or None."""
        if self.snapshot is None or self.snapshot_in_progress:
            return None
        self.snapshot_in_progress = True
        return self.snapshot

    def hand_entries(self) -> list[Entry]:
        """The entries never handed out before; marks them in progress."""
        entries = self.entries[self.in_progress - self.offset :]
        self.in_progress = self.offset + len(self.entries)
        return entries

    def truncate_and_append(self, entries: list[Entry]) -> None:
        """Appends entries, replacing any existing ones from entries[0].index on."""
        start = entries[0].index
        if start == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif start <= self.offset:
            # Replaces the whole tail, and (through offset) the durable entries >= start.
            self.entries = list(entries)
            self.offset = start
        else:
            self.entries = self.entries[: start - self.offset] + list(entries)
        self.in_progress = min(self.in_progress, start)

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted entries up to (index, term): drop them from the tail.

        Ignored when the tail no longer holds that exact entry (it was replaced while
        being persisted); a later Ready will cover the replacement.
        """
        if self.term(index) != term or index < self.offset or index >= self.in_progress:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snapshot_to(self, index: int) -> None:
        """The driver persisted the snapshot at `index`."""
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None
            self.snapshot_in_progress = False

    def restore(self, snapshot: Snapshot) -> None:
        """Replaces the whole tail with a snapshot still to be persisted."""
        self.snapshot = snapshot
        self.snapshot_in_progress = False
        self.entries = []
        self.offset = snapshot.meta.index + 1
        self.in_progress = self.offset
