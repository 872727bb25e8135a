"""RaftLog: the node's whole log (durable Storage + Unstable tail) and its commit/applied indexes.

Invariants (etcd's raftLog):
- `applied <= committed <= last_index()`;
- everything below `unstable.offset` is durable in Storage (the "stable index");
- committed entries are only handed out for applying once they are also stable
  here, so an entry is never applied before the local fsync (etcd #14370).
"""

from __future__ import annotations

from .errors import CompactedError, RaftError, UnavailableError
from .storage import Storage
from .types import Entry, Snapshot
from .unstable import Unstable

_ENTRY_OVERHEAD = 16  # rough per-entry framing cost for size limits
_STORAGE_CHUNK = 64  # entries fetched from Storage at a time while size-limiting


class LogConflictError(RaftError):
    """An append would overwrite a committed entry; only a faulty peer asks for that."""


def entry_size(entry: Entry) -> int:
    return len(entry.data) + _ENTRY_OVERHEAD


class RaftLog:
    """The log as the core sees it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.unstable = Unstable(storage.last_index() + 1)
        first = storage.first_index()
        self.committed = first - 1
        self.applied = first - 1

    # -- shape -------------------------------------------------------------------

    def first_index(self) -> int:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot.meta.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        return self.unstable.last_index()

    def stable_index(self) -> int:
        """The last index durable locally and part of this log (ignores a snapshot
        still being persisted; callers check `unstable.snapshot` where it matters)."""
        return self.unstable.offset - 1

    def term(self, index: int) -> int:
        """The term at `index`; CompactedError / UnavailableError when unknown."""
        term = self.unstable.term(index)
        if term is not None:
            return term
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond the last {self.last_index()}")
        if index < self.first_index() - 1 or self.unstable.snapshot is not None:
            raise CompactedError(f"index {index} is compacted")
        return self.storage.term(index)

    def term_or_none(self, index: int) -> int | None:
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return None

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        return self.term_or_none(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (last_index, term) is at least as up to date (§5.4.1)."""
        my_term = self.last_term()
        return term > my_term or (term == my_term and last_index >= self.last_index())

    # -- reading entries ---------------------------------------------------------

    def slice(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries in [lo, hi) up to about max_size bytes (always at least one).
        CompactedError if lo is compacted."""
        if lo < self.first_index():
            raise CompactedError(f"index {lo} is compacted")
        hi = min(hi, self.last_index() + 1)
        out: list[Entry] = []
        size = 0
        index = lo
        while index < hi:
            chunk = self._chunk(index, hi)
            for entry in chunk:
                size += entry_size(entry)
                if out and size > max_size:
                    return out
                out.append(entry)
            index += len(chunk)
        return out

    def _chunk(self, lo: int, hi: int) -> list[Entry]:
        if lo >= self.unstable.offset:
            return self.unstable.slice(lo, min(hi, lo + _STORAGE_CHUNK))
        return self.storage.entries(lo, min(hi, self.unstable.offset, lo + _STORAGE_CHUNK))

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # -- appending ---------------------------------------------------------------

    def append(self, entries: list[Entry]) -> int:
        """Appends (a leader's own new entries); returns the new last index."""
        if entries:
            self.unstable.truncate_and_append(entries)
        return self.last_index()

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: tuple[Entry, ...]
    ) -> tuple[int, int] | None:
        """A follower's AppendEntries: None if (prev_index, prev_term) does not match,
        else appends from the first conflicting entry and returns (the last new index,
        the first index whose existing entry was replaced, or 0).
        Raises LogConflictError if that would rewrite a committed entry."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self._find_conflict(entries)
        replaced = 0
        if conflict:
            # Unreachable while callers answer prev_index < committed without
            # appending; kept so a committed entry can never be overwritten.
            if conflict <= self.committed:
                raise LogConflictError(f"entry {conflict} conflicts with the committed log")
            if conflict <= self.last_index():
                replaced = conflict
            self.unstable.truncate_and_append(list(entries[conflict - prev_index - 1 :]))
        self.commit_to(min(commit, last_new))
        return last_new, replaced

    def _find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """The index of the first entry not already in the log (0 if all are)."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with that term.

        This is the fast log back-off: everything above it is either missing or of a
        term the other side cannot hold at those positions. (index, 0) when the
        search runs into compacted entries.
        """
        index = min(index, self.last_index())
        while index > 0:
            found = self.term_or_none(index)
            if found is None:
                return index, 0
            if found <= term:
                return index, found
            index -= 1
        return 0, 0

    def restore(self, snapshot: Snapshot) -> None:
        """Replaces the whole log with `snapshot` (still to be persisted)."""
        self.unstable.restore(snapshot)
        self.committed = snapshot.meta.index

    # -- commit and apply --------------------------------------------------------

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise AssertionError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commits up to `index` if that entry is of `term` (only current-term entries
        commit by counting replicas, §5.4.2)."""
        if index > self.committed and self.term_or_none(index) == term:
            self.commit_to(index)
            return True
        return False

    def _apply_limit(self) -> int:
        return min(self.committed, self.stable_index())

    def has_next_committed_entries(self) -> bool:
        return self.unstable.snapshot is None and self.applied < self._apply_limit()

    def next_committed_entries(self, max_size: int) -> list[Entry]:
        """Committed, locally durable entries not yet applied."""
        if not self.has_next_committed_entries():
            return []
        return self.slice(self.applied + 1, self._apply_limit() + 1, max_size)

    def applied_to(self, index: int) -> None:
        if index > self.applied:
            self.applied = min(index, self.committed)
