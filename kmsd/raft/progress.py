"""A leader's per-peer replication progress and flow control (etcd's tracker.Progress).

State machine per peer (see docs/raft.md):
  PROBE     --ack-->             REPLICATE   (match found: pipeline appends)
  REPLICATE --reject/unreachable--> PROBE
  any       --needs compacted entries--> SNAPSHOT --ack/report--> PROBE
In PROBE at most one append is outstanding (`probe_sent`) until a response or a
heartbeat response; in REPLICATE at most `max_inflight` appends are unacknowledged.
"""

from __future__ import annotations

from collections import deque

from .types import ProgressState


class Inflights:
    """The last indexes of appends sent but not acknowledged, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._last_indexes: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._last_indexes)

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def add(self, last_index: int) -> None:
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        """An ack up to `index` frees every append ending at or before it."""
        while self._last_indexes and self._last_indexes[0] <= index:
            self._last_indexes.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def reset(self) -> None:
        self._last_indexes.clear()


class Progress:
    """What the leader knows of one peer. Invariant: match < next."""

    def __init__(self, next_index: int, max_inflight: int, now: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = True
        self.probe_sent = False
        self.last_active = now
        self.inflights = Inflights(max_inflight)

    def _reset_state(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        # After a snapshot, resume right after it: the follower is known to hold it
        # once it reports so, and probing below it would only be rejected.
        resume = max(self.match + 1, self.pending_snapshot + 1)
        self._reset_state(ProgressState.PROBE)
        self.next = resume

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """An ack up to `index`; False if it tells nothing new (stale or duplicate)."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, hint: int) -> bool:
        """A rejection of the append after `rejected`; False if it is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # answers an older probe
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def sent_append(self, last_index: int | None) -> None:
        """Records an append just sent (`last_index` None when it carried no entry)."""
        if self.state == ProgressState.REPLICATE:
            if last_index is not None:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True
