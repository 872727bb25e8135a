"""Leadership: everything a node holds and does only while it is the leader of one term.

A `Leadership` is created when a node wins an election and dropped when it steps
down, so no leader-only state (progress, pending reads, transfer target, pending
conf change) can leak into a later term. It replicates the log (probe/replicate/
snapshot flow control), advances the commit index by counting voters' acks, runs
check-quorum, read-index rounds and leadership transfer.

The leader's own acknowledgement is `self_ack()`, called from RawNode.advance()
once the driver has persisted the entries: the leader never counts entries it has
not fsynced itself, which is what allows the driver to send APPENDs before its
own fsync (thesis §10.2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from . import quorum
from .config import Config
from .errors import CompactedError, ProposalDropped, SnapshotTemporarilyUnavailableError
from .log import RaftLog
from .membership import Membership
from .progress import Progress
from .read_only import ReadOnly, decode_seq, encode_seq
from .types import (
    ConfChange,
    Entry,
    EntryType,
    Message,
    MessageType,
    PeerProgress,
    ProgressState,
    ReadState,
    Snapshot,
)


class Send(Protocol):
    """Queues a message of the current term from this node (implemented by core.Raft)."""

    def __call__(
        self,
        kind: MessageType,
        to: int,
        *,
        index: int = 0,
        log_term: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        snapshot: Snapshot | None = None,
        context: bytes = b"",
    ) -> None: ...


class Leadership:
    """The leader of `term` on node `node_id`."""

    def __init__(
        self,
        *,
        config: Config,
        term: int,
        log: RaftLog,
        membership: Membership,
        send: Send,
        emit_read: Callable[[ReadState], None],
    ) -> None:
        self.cfg = config
        self.id = config.id
        self.term = term
        self.log = log
        self.membership = membership
        self._send = send
        self._emit_read = emit_read
        self.now = 0
        self.heartbeat_elapsed = 0
        self.election_elapsed = 0
        self.transferee = 0
        # Any conf change already in the log must be applied before a new one.
        self.pending_conf_index = log.last_index()
        self.read_only = ReadOnly()
        self.postponed_reads: list[tuple[int, bytes]] = []
        self.progress: dict[int, Progress] = {}
        for node in sorted(membership.members()):
            self._add_progress(node, active=node == self.id)
        me = self.progress.get(self.id)
        if me is not None:
            me.match = log.stable_index()
            me.become_replicate()
        self._handlers: dict[MessageType, Callable[[Message], None]] = {
            MessageType.APPEND_RESP: self._handle_append_resp,
            MessageType.HEARTBEAT_RESP: self._handle_heartbeat_resp,
            MessageType.READ_INDEX: self._handle_read_index,
        }

    def _add_progress(self, node: int, *, active: bool) -> None:
        progress = Progress(self.log.last_index() + 1, self.cfg.max_inflight_msgs, self.now)
        progress.recent_active = active
        self.progress[node] = progress

    def start(self) -> None:
        """Appends the term's no-op (§8: it commits earlier terms' entries and enables
        read-index) and starts replicating."""
        self._append([(EntryType.NOOP, b"")])
        self.bcast_append()

    # -- proposals ---------------------------------------------------------------

    def _append(self, items: list[tuple[EntryType, bytes]]) -> list[int]:
        first = self.log.last_index() + 1
        entries = [Entry(first + i, self.term, kind, data) for i, (kind, data) in enumerate(items)]
        self.log.append(entries)
        return [e.index for e in entries]

    def propose(self, datas: list[bytes]) -> list[int]:
        if self.transferee:
            raise ProposalDropped(f"leadership is being transferred to {self.transferee}")
        indexes = self._append([(EntryType.NORMAL, d) for d in datas])
        self.bcast_append()
        return indexes

    def propose_conf_change(self, change: ConfChange) -> int:
        if self.transferee:
            raise ProposalDropped(f"leadership is being transferred to {self.transferee}")
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped("another conf change is not applied yet")
        if not self.committed_in_term():
            raise ProposalDropped("the leader has not committed an entry in its term yet")
        refusal = self.membership.refusal(change)
        if refusal:
            raise ValueError(refusal)
        (index,) = self._append([(EntryType.CONF_CHANGE, change.encode())])
        self.pending_conf_index = index
        self.bcast_append()
        return index

    def committed_in_term(self) -> bool:
        return self.log.term_or_none(self.log.committed) == self.term

    # -- commit ------------------------------------------------------------------

    def maybe_commit(self) -> bool:
        voters = self.membership.voters
        match = {node: p.match for node, p in self.progress.items() if node in voters}
        return self.log.maybe_commit(quorum.committed_index(voters, match), self.term)

    def _on_commit_advanced(self) -> None:
        if self.postponed_reads and self.committed_in_term():
            postponed, self.postponed_reads = self.postponed_reads, []
            self._start_reads(postponed)
        self.bcast_append()

    def self_ack(self) -> None:
        """The driver persisted our entries: count them for ourselves."""
        me = self.progress.get(self.id)
        if me is not None and me.maybe_update(self.log.stable_index()) and self.maybe_commit():
            self._on_commit_advanced()

    # -- replication -------------------------------------------------------------

    def send_append(self, to: int, send_if_empty: bool = True) -> bool:
        """Sends `to` the entries it misses (or a snapshot); False if nothing was sent."""
        progress = self.progress.get(to)
        if progress is None or to == self.id or progress.is_paused():
            return False
        last = self.log.last_index()
        progress.next = min(progress.next, last + 1)
        prev = progress.next - 1
        prev_term = self.log.term_or_none(prev)
        if prev_term is None:
            return self._send_snapshot(to, progress)
        try:
            entries = self.log.slice(progress.next, last + 1, self.cfg.max_size_per_msg)
        except CompactedError:
            return self._send_snapshot(to, progress)
        if not entries and not send_if_empty:
            return False
        self._send(
            MessageType.APPEND,
            to,
            index=prev,
            log_term=prev_term,
            entries=tuple(entries),
            commit=self.log.committed,
        )
        progress.sent_append(entries[-1].index if entries else None)
        return True

    def _send_snapshot(self, to: int, progress: Progress) -> bool:
        # Only to a peer that answers: a snapshot is large and a dead peer wastes it.
        if not progress.recent_active:
            return False
        try:
            snapshot = self.log.snapshot()
        except SnapshotTemporarilyUnavailableError:
            return False
        if snapshot.meta.index == 0:
            return False
        progress.become_snapshot(snapshot.meta.index)
        self._send(MessageType.SNAPSHOT, to, snapshot=snapshot)
        return True

    def bcast_append(self) -> None:
        for node in sorted(self.progress):
            if node != self.id:
                self.send_append(node)

    def bcast_heartbeat(self) -> None:
        last_seq = self.read_only.last_seq()
        context = encode_seq(last_seq) if last_seq is not None else b""
        for node, progress in sorted(self.progress.items()):
            if node != self.id:
                commit = min(progress.match, self.log.committed)
                self._send(MessageType.HEARTBEAT, node, commit=commit, context=context)

    # -- incoming ----------------------------------------------------------------

    def step(self, m: Message) -> None:
        handler = self._handlers.get(MessageType(m.type))
        if handler is not None:
            handler(m)

    def _mark_active(self, progress: Progress) -> None:
        progress.recent_active = True
        progress.last_active = self.now

    def _handle_append_resp(self, m: Message) -> None:
        progress = self.progress.get(m.src)
        if progress is None:
            return
        self._mark_active(progress)
        if m.reject:
            self._handle_reject(m, progress)
        elif m.index <= self.log.last_index():  # a peer cannot ack what we never sent
            self._handle_ack(m, progress)

    def _handle_reject(self, m: Message, progress: Progress) -> None:
        hint = m.reject_hint
        if m.log_term > 0:
            # Skip every entry of ours whose term the follower cannot have there.
            hint, _ = self.log.find_conflict_by_term(hint, m.log_term)
        if progress.maybe_decrease_to(m.index, hint):
            if progress.state == ProgressState.REPLICATE:
                progress.become_probe()
            self.send_append(m.src)

    def _handle_ack(self, m: Message, progress: Progress) -> None:
        was_paused = progress.is_paused()
        probe_confirmed = progress.state == ProgressState.PROBE and progress.match == m.index
        if not progress.maybe_update(m.index) and not probe_confirmed:
            return
        if progress.state == ProgressState.PROBE:
            progress.become_replicate()
        elif progress.state == ProgressState.SNAPSHOT:
            if progress.match + 1 >= self.log.first_index():
                progress.become_probe()
                progress.become_replicate()
        else:
            progress.inflights.free_le(m.index)
        if self.maybe_commit():
            self._on_commit_advanced()
        elif was_paused:
            self.send_append(m.src)
        while self.send_append(m.src, send_if_empty=False):
            pass
        if m.src == self.transferee:
            self._maybe_timeout_now(m.src)

    def _handle_heartbeat_resp(self, m: Message) -> None:
        progress = self.progress.get(m.src)
        if progress is None:
            return
        self._mark_active(progress)
        progress.probe_sent = False
        if progress.state == ProgressState.REPLICATE and progress.inflights.full():
            progress.inflights.free_first_one()
        if progress.match < self.log.last_index():
            self.send_append(m.src)
        if m.context:
            self._ack_read(m.src, m.context)

    def _handle_read_index(self, m: Message) -> None:
        self.read_index(m.src, m.context)

    # -- read index --------------------------------------------------------------

    def read_index(self, origin: int, context: bytes) -> None:
        # The commit index is only known to be the latest once an entry of this
        # term is committed (thesis §6.4); until then, wait.
        if not self.committed_in_term():
            self.postponed_reads.append((origin, context))
            return
        self._start_reads([(origin, context)])

    def _start_reads(self, requests: list[tuple[int, bytes]]) -> None:
        if self.membership.voters == {self.id}:
            for origin, context in requests:
                self._respond_read(origin, self.log.committed, context)
            return
        for origin, context in requests:
            request = self.read_only.add(self.log.committed, origin, context)
            self.read_only.ack(self.id, request.seq)
        self.bcast_heartbeat()

    def _ack_read(self, voter: int, context: bytes) -> None:
        seq = decode_seq(context)
        if seq is None:
            return
        acks = self.read_only.ack(voter, seq)
        if acks is None or not quorum.has_quorum(self.membership.voters, acks):
            return
        for request in self.read_only.release_through(seq):
            self._respond_read(request.origin, request.index, request.context)

    def _respond_read(self, origin: int, index: int, context: bytes) -> None:
        if origin == self.id:
            self._emit_read(ReadState(index, context))
        else:
            self._send(MessageType.READ_INDEX_RESP, origin, index=index, context=context)

    # -- time, transfer, membership ----------------------------------------------

    def tick(self) -> bool:
        """Advances one tick; False when the leader must step down (lost its quorum)."""
        self.now += 1
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                if not self._quorum_active():
                    return False
                for node, progress in self.progress.items():
                    if node != self.id:
                        progress.recent_active = False
            self.transferee = 0  # a transfer not done within an election timeout failed
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat()
        return True

    def _quorum_active(self) -> bool:
        active = {n for n, p in self.progress.items() if p.recent_active} | {self.id}
        return quorum.has_quorum(self.membership.voters, active)

    def quorum_contact_age(self) -> int | None:
        ages = {n: self.now - p.last_active for n, p in self.progress.items()}
        ages[self.id] = 0
        return quorum.quorum_age(self.membership.voters, ages)

    def transfer(self, to: int) -> None:
        if self.transferee == to:
            return
        self.transferee = to
        self.election_elapsed = 0
        if not self._maybe_timeout_now(to):
            self.send_append(to)

    def _maybe_timeout_now(self, to: int) -> bool:
        progress = self.progress.get(to)
        if progress is None or progress.match != self.log.last_index():
            return False
        self._send(MessageType.TIMEOUT_NOW, to)
        return True

    def on_conf_change(self) -> bool:
        """Syncs progress with the new membership; False if we must step down."""
        members = self.membership.members()
        added = [n for n in sorted(members) if n not in self.progress]
        for node in added:
            self._add_progress(node, active=True)
        for node in [n for n in self.progress if n not in members]:
            del self.progress[node]
        if self.id not in self.membership.voters:
            return False  # StepDownOnRemoval
        if self.transferee and self.transferee not in self.membership.voters:
            self.transferee = 0
        if self.maybe_commit():
            self._on_commit_advanced()
        for node in added:
            self.send_append(node)
        return True

    def report_unreachable(self, node: int) -> None:
        progress = self.progress.get(node)
        if progress is not None and progress.state == ProgressState.REPLICATE:
            progress.become_probe()

    def report_snapshot(self, node: int, ok: bool) -> None:
        progress = self.progress.get(node)
        if progress is None or progress.state != ProgressState.SNAPSHOT:
            return
        if not ok:
            progress.pending_snapshot = 0
        progress.become_probe()
        # Wait for the follower's answer (or the next heartbeat) before probing.
        progress.probe_sent = True

    def peer_status(self) -> dict[int, PeerProgress]:
        return {
            node: PeerProgress(
                match=p.match,
                next=p.next,
                state=p.state,
                recent_active=p.recent_active,
                is_learner=node in self.membership.learners,
                pending_snapshot=p.pending_snapshot,
                inflight=len(p.inflights),
                ticks_since_active=0 if node == self.id else self.now - p.last_active,
            )
            for node, p in sorted(self.progress.items())
        }
