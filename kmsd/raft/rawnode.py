"""RawNode: the driver's interface to the Raft core (etcd's RawNode), and the Ready contract.

The driver (kmsd/log/raft_log.py, one asyncio task) feeds the node ticks, peer messages
and requests, and processes its output in Ready batches:

    if node.has_ready():
        rd = node.ready()
        1. persist rd.snapshot, rd.entries and then rd.hard_state (entries before the
           hard state, or atomically); fsync if rd.must_sync. A write error is fatal.
           Then mirror them into the MemoryStorage the core reads
           (apply_snapshot / append / set_hard_state).
        2. only then send rd.messages. (Exception, thesis §10.2.1: if
           rd.early_send_ok, the messages may be sent before or during the fsync;
           the core counts the leader's own entries only in advance().)
        3. apply rd.snapshot, then rd.committed_entries in order (calling
           apply_conf_change for CONF_CHANGE entries), and serve rd.read_states
           once applied >= their index.
        4. node.advance(rd).

Guarantees: `committed_entries` are committed on a quorum *and* durable locally
(persisted in an earlier Ready), so applying them never outruns the local fsync
(etcd #14370). A leader counts itself towards a quorum only in `advance()`.
`must_sync` is False when only the commit index changed: commit is recoverable
and may be written lazily (etcd's rule).

Between ready() and advance() the driver may keep calling tick/step/propose (e.g.
while the fsync runs); what they produce goes into the next Ready. ready() may not
be called again before advance(); has_ready() is False meanwhile.

Peer input never raises: a malformed message, or one from a removed peer, or a
non-campaign/non-leader message from an id outside the membership, is dropped and
counted in `Status.dropped_messages`. Campaign and leader messages from unknown
ids are accepted because a node's applied membership can lag the cluster's
(thesis §4.2.1): refusing them can wedge a cluster that just added a node.
"""

from __future__ import annotations

import dataclasses
import random

from .config import Config
from .core import Raft
from .storage import Storage
from .types import ConfChange, ConfState, HardState, Message, MessageType, Ready, SoftState, Status
from .validate import CAMPAIGN_AND_LEADER_TYPES, check_message

__all__ = ["Config", "RawNode"]

# Messages that neither acknowledge entries nor grant or request a vote.
_EARLY_SEND_TYPES = frozenset(
    {
        MessageType.APPEND,
        MessageType.HEARTBEAT,
        MessageType.HEARTBEAT_RESP,
        MessageType.SNAPSHOT,
        MessageType.TIMEOUT_NOW,
        MessageType.READ_INDEX,
        MessageType.READ_INDEX_RESP,
        MessageType.PRE_VOTE,
        MessageType.PRE_VOTE_RESP,
    }
)


class RawNode:
    """A thread-unsafe Raft node driven by ticks, messages and Ready/advance."""

    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        """Restores term, vote and commit from `storage` (the term is never reset)."""
        self._raft = Raft(config, storage, rng)
        self._prev_soft: SoftState = self._raft.soft_state()
        self._prev_hard: HardState = self._raft.hard_state()
        self._outstanding: Ready | None = None

    # -- inputs ------------------------------------------------------------------

    def tick(self) -> None:
        """Advances the logical clock by one tick."""
        self._raft.tick()

    def step(self, message: Message) -> None:
        """Feeds a message received from a peer. Never raises on bad input."""
        raft = self._raft
        reason = check_message(message, raft.id) or self._sender_refusal(message)
        if reason:
            raft.dropped_messages += 1
            return
        if type(message.type) is not MessageType:
            message = dataclasses.replace(message, type=MessageType(message.type))
        raft.step(message)

    def _sender_refusal(self, m: Message) -> str | None:
        membership = self._raft.membership
        if m.src in membership.removed:
            return "sender was removed"
        if m.src not in membership.members() and m.type not in CAMPAIGN_AND_LEADER_TYPES:
            return "sender is not a member"
        return None

    def campaign(self) -> None:
        """Starts an election now (pre-vote first if enabled); no-op on a leader."""
        self._raft.campaign()

    def propose(self, data: bytes) -> int:
        """Appends a NORMAL entry on the leader; returns its index (its term is the
        current term). Raises ProposalDropped if not leader or transferring."""
        return self._raft.propose([data])[0]

    def propose_batch(self, datas: list[bytes]) -> list[int]:
        """Like propose, for several entries sent in one APPEND."""
        return self._raft.propose(list(datas))

    def propose_conf_change(self, change: ConfChange) -> int:
        """Appends a CONF_CHANGE entry; returns its index. ProposalDropped if not leader,
        transferring, another change is not applied yet, or no entry of this term is
        committed yet; ValueError if the change is invalid for the membership."""
        return self._raft.propose_conf_change(change)

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """Applies a committed CONF_CHANGE entry (driver step 3); returns the new
        membership. A leader that is no longer a voter steps down. Never raises: a
        change the applied membership refuses (see `conf_change_refusal`) is skipped,
        the same way on every node."""
        return self._raft.apply_conf_change(change)

    def conf_change_refusal(self, change: ConfChange) -> str | None:
        """Why `change` is invalid for the applied membership (re-adding a removed id,
        removing a non-member or the last voter, ...), or None. A committed change
        with a refusal is skipped by `apply_conf_change`: a driver asks first to tell
        whoever proposed it."""
        return self._raft.conf_change_refusal(change)

    def read_index(self, context: bytes) -> None:
        """Requests a linearizable read; a ReadState with `context` arrives in a later
        Ready. Contexts must be unique among reads in flight. ReadIndexDropped if no
        leader is known; a request lost with a leader change never answers (time out)."""
        self._raft.read_index(context)

    def transfer_leader(self, to: int) -> None:
        """Hands leadership to voter `to` (TIMEOUT_NOW once it is caught up); aborted
        after an election timeout. ProposalDropped if not leader."""
        self._raft.transfer_leader(to)

    def report_unreachable(self, node: int) -> None:
        """The transport failed to reach `node`: stop pipelining to it."""
        if self._raft.leadership is not None:
            self._raft.leadership.report_unreachable(node)

    def report_snapshot(self, node: int, ok: bool) -> None:
        """The driver finished streaming a SNAPSHOT message to `node` (or failed)."""
        if self._raft.leadership is not None:
            self._raft.leadership.report_snapshot(node, ok)

    # -- outputs -----------------------------------------------------------------

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        raft = self._raft
        return bool(
            raft.soft_state() != self._prev_soft
            or raft.hard_state() != self._prev_hard
            or raft.log.unstable.has_unhanded()
            or raft.msgs
            or raft.read_states
            or raft.log.has_next_committed_entries()
        )

    def ready(self) -> Ready:
        """The next batch of work; see the module docstring for what to do with it."""
        if self._outstanding is not None:
            raise RuntimeError("advance() the previous Ready before asking for another")
        raft = self._raft
        soft, hard = raft.soft_state(), raft.hard_state()
        snapshot = raft.log.unstable.hand_snapshot()
        entries = raft.log.unstable.hand_entries()
        committed = raft.log.next_committed_entries(raft.cfg.max_committed_size_per_ready)
        messages, raft.msgs = raft.msgs, []
        read_states, raft.read_states = raft.read_states, []
        prev = self._prev_hard
        vote_changed = (hard.term, hard.vote) != (prev.term, prev.vote)
        ready = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != prev else None,
            entries=entries,
            snapshot=snapshot,
            committed_entries=committed,
            messages=messages,
            read_states=read_states,
            must_sync=bool(entries) or snapshot is not None or vote_changed,
            early_send_ok=not vote_changed and all(m.type in _EARLY_SEND_TYPES for m in messages),
        )
        self._prev_soft, self._prev_hard = soft, hard
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied `ready`."""
        if ready is not self._outstanding:
            raise RuntimeError("advance() must be given the outstanding Ready")
        self._outstanding = None
        log = self._raft.log
        if ready.snapshot is not None:
            log.unstable.stable_snapshot_to(ready.snapshot.meta.index)
            log.applied_to(ready.snapshot.meta.index)
        if ready.entries:
            last = ready.entries[-1]
            log.unstable.stable_to(last.index, last.term)
        if ready.committed_entries:
            log.applied_to(ready.committed_entries[-1].index)
        self._raft.on_advance()

    # -- observation -------------------------------------------------------------

    def status(self) -> Status:
        return self._raft.status()

    @property
    def id(self) -> int:
        return self._raft.id

    @property
    def term(self) -> int:
        return self._raft.term

    def soft_state(self) -> SoftState:
        """The current leader and role (cheaper than status())."""
        return self._raft.soft_state()

    def hard_state(self) -> HardState:
        """The current term, vote and commit (persisted or not)."""
        return self._raft.hard_state()
