"""Raft: the per-node consensus state machine (terms, roles, elections, follower side).

Pure and deterministic: it is driven by `tick()` and `step(message)`, draws
randomness only from the injected `random.Random`, and its only outputs are
queued messages, read states and the log (which RawNode turns into Ready batches).
Leader-only behaviour lives in `leader.Leadership`, created on winning an election.

Messages reaching `step` were already checked for shape and sender by RawNode.
Term rules (§5.1, etcd): a higher term makes us a follower of it (except for
pre-votes, and for vote requests while we still hear from a leader: check-quorum
lease); a lower term is ignored, answered only so a stale leader or pre-candidate
learns the current term.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .config import Config
from .errors import (
    ConfigError,
    ProposalDropped,
    ReadIndexDropped,
    SnapshotTemporarilyUnavailableError,
)
from .leader import Leadership
from .log import LogConflictError, RaftLog
from .membership import Membership
from .quorum import VoteResult, vote_result
from .storage import Storage
from .types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SoftState,
    Status,
)

CAMPAIGN_TRANSFER = b"transfer"
_LEADER_TRAFFIC = frozenset({MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT})
_SCAN_BYTES = 1 << 20


class Raft:
    """One node's Raft state. Not thread-safe; used through RawNode."""

    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        self.cfg = config
        self.id = config.id
        self.rng = rng
        self.log = RaftLog(storage)
        hard_state, conf = storage.initial_state()
        self.term = hard_state.term
        self.vote = hard_state.vote
        self._load_commit(hard_state.commit, config.applied)
        self.membership = Membership(conf)
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.role = Role.FOLLOWER
        self.lead = 0
        self.votes: dict[int, bool] = {}
        self.leadership: Leadership | None = None
        self.election_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.leader_contact: int | None = None
        self.dropped_messages = 0
        self._follower_handlers: dict[MessageType, Callable[[Message], None]] = {
            MessageType.APPEND: self._handle_append,
            MessageType.HEARTBEAT: self._handle_heartbeat,
            MessageType.SNAPSHOT: self._handle_snapshot,
            MessageType.TIMEOUT_NOW: self._handle_timeout_now,
            MessageType.READ_INDEX_RESP: self._handle_read_index_resp,
        }
        self._become_follower(self.term, 0)

    def _load_commit(self, commit: int, applied: int) -> None:
        last = self.log.last_index()
        if commit > last:
            raise ConfigError(f"persisted commit {commit} is beyond the last index {last}")
        # The snapshot is committed by definition, and the driver restores its state
        # machine from it: start applying after it even if the log reaches further back.
        try:
            snapshot_index = self.log.storage.snapshot().meta.index
        except SnapshotTemporarilyUnavailableError:
            snapshot_index = 0
        if snapshot_index > last:
            raise ConfigError(f"snapshot {snapshot_index} is beyond the last index {last}")
        self.log.committed = max(commit, snapshot_index, self.log.committed)
        if applied > self.log.committed:
            raise ConfigError(f"applied {applied} is beyond the commit {self.log.committed}")
        self.log.applied = max(applied, snapshot_index, self.log.applied)

    # -- outputs -------------------------------------------------------------------

    def send(
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
        term: int | None = None,
        reject: bool = False,
        reject_hint: int = 0,
    ) -> None:
        self.msgs.append(
            Message(
                type=kind,
                src=self.id,
                dst=to,
                term=self.term if term is None else term,
                log_term=log_term,
                index=index,
                entries=entries,
                commit=commit,
                reject=reject,
                reject_hint=reject_hint,
                snapshot=snapshot,
                context=context,
            )
        )

    def _emit_read(self, state: ReadState) -> None:
        self.read_states.append(state)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    # -- role transitions --------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = 0
        self.lead = 0
        self.election_elapsed = 0
        self._randomize_election_timeout()
        self.votes = {}
        self.leadership = None

    def _randomize_election_timeout(self) -> None:
        election = self.cfg.election_tick
        self.randomized_election_timeout = election + self.rng.randrange(election)

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead
        self.leader_contact = 0 if lead else None

    def _become_pre_candidate(self) -> None:
        # No term or vote change: a pre-vote must leave no trace if it fails.
        self.role = Role.PRE_CANDIDATE
        self.votes = {}
        self.lead = 0
        self.leader_contact = None

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self.leader_contact = None

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        self.leader_contact = 0
        self.leadership = Leadership(
            config=self.cfg,
            term=self.term,
            log=self.log,
            membership=self.membership,
            send=self.send,
            emit_read=self._emit_read,
        )
        self.leadership.start()

    # -- elections -----------------------------------------------------------------

    def promotable(self) -> bool:
        return self.id in self.membership.voters

    def campaign(self, transfer: bool = False) -> None:
        """Starts an election now (with a pre-vote first unless transferring)."""
        if self.role == Role.LEADER or not self.promotable():
            return
        if self._has_unapplied_conf_changes():
            return  # our membership may be stale: counting votes with it is unsafe
        self._campaign(pre=self.cfg.pre_vote and not transfer, transfer=transfer)

    def _has_unapplied_conf_changes(self) -> bool:
        if self.log.unstable.snapshot is not None:
            return True  # a snapshot not yet applied may carry a membership
        index, end = self.log.applied + 1, self.log.committed + 1
        while index < end:
            chunk = self.log.slice(index, end, _SCAN_BYTES)
            if any(e.type == EntryType.CONF_CHANGE for e in chunk):
                return True
            index += len(chunk)
        return False

    def _campaign(self, *, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            kind, term = MessageType.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            kind, term = MessageType.VOTE, self.term
        self.votes[self.id] = True
        if self._tally() == VoteResult.WON:
            self._won()
            return
        context = CAMPAIGN_TRANSFER if transfer else b""
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for voter in sorted(self.membership.voters - {self.id}):
            self.send(kind, voter, term=term, index=last_index, log_term=last_term, context=context)

    def _tally(self) -> VoteResult:
        return vote_result(self.membership.voters, self.votes)

    def _won(self) -> None:
        if self.role == Role.PRE_CANDIDATE:
            self._campaign(pre=False, transfer=False)
        else:
            self._become_leader()

    def _handle_vote_request(self, m: Message) -> None:
        kind = MessageType(m.type)
        response = (
            MessageType.PRE_VOTE_RESP if kind == MessageType.PRE_VOTE else MessageType.VOTE_RESP
        )
        can_vote = (
            self.vote == m.src
            or (self.vote == 0 and self.lead == 0)
            or (kind == MessageType.PRE_VOTE and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # A granted pre-vote answers in the term it asked about.
            self.send(response, m.src, term=m.term)
            if kind == MessageType.VOTE:
                self.election_elapsed = 0
                self.vote = m.src
        else:
            self.send(response, m.src, reject=True)

    def _handle_vote_response(self, m: Message) -> None:
        if m.src not in self.membership.voters:
            return
        if m.type == MessageType.PRE_VOTE_RESP and not m.reject and m.term != self.term + 1:
            return  # a grant from an older pre-vote round
        self.votes.setdefault(m.src, not m.reject)
        result = self._tally()
        if result == VoteResult.WON:
            self._won()
        elif result == VoteResult.LOST:
            self._become_follower(self.term, 0)

    # -- ticks -------------------------------------------------------------------

    def tick(self) -> None:
        if self.leadership is not None:
            if not self.leadership.tick():
                self._become_follower(self.term, 0)  # check-quorum failed
            return
        self.election_elapsed += 1
        if self.leader_contact is not None:
            self.leader_contact += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            # A fresh draw per attempt: a pre-vote round that stays pending keeps the
            # term (so no reset), and nodes with equal timeouts would keep colliding.
            self._randomize_election_timeout()
            self.campaign()

    # -- step ------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Handles a well-formed message from a peer."""
        if m.term > self.term:
            if not self._adopt_higher_term(m):
                return
        elif m.term < self.term:
            self._answer_stale(m)
            return
        kind = MessageType(m.type)
        if kind in (MessageType.PRE_VOTE, MessageType.VOTE):
            self._handle_vote_request(m)
        elif self.leadership is not None:
            self.leadership.step(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _in_lease(self) -> bool:
        """Whether we believe a leader is alive (then vote requests are ignored)."""
        if not self.cfg.check_quorum:
            return False
        if self.role == Role.LEADER:
            return True
        return self.lead != 0 and self.election_elapsed < self.cfg.election_tick

    def _adopt_higher_term(self, m: Message) -> bool:
        kind = MessageType(m.type)
        campaigning = kind in (MessageType.PRE_VOTE, MessageType.VOTE)
        if campaigning and m.context != CAMPAIGN_TRANSFER and self._in_lease():
            return False
        if kind == MessageType.PRE_VOTE or (kind == MessageType.PRE_VOTE_RESP and not m.reject):
            return True  # asks about / grants a future term: ours does not change
        self._become_follower(m.term, m.src if kind in _LEADER_TRAFFIC else 0)
        return True

    def _answer_stale(self, m: Message) -> None:
        kind = MessageType(m.type)
        if kind in (MessageType.APPEND, MessageType.HEARTBEAT):
            # Tell a deposed leader the new term, or with check-quorum/pre-vote it
            # may never learn it (nobody else would raise its term).
            if self.cfg.check_quorum or self.cfg.pre_vote:
                self.send(MessageType.APPEND_RESP, m.src)
        elif kind == MessageType.PRE_VOTE:
            self.send(MessageType.PRE_VOTE_RESP, m.src, reject=True)

    def _step_candidate(self, m: Message) -> None:
        kind = MessageType(m.type)
        if kind in _LEADER_TRAFFIC:
            self._become_follower(self.term, m.src)  # a leader of our term exists
            self._step_follower(m)
            return
        expected = (
            MessageType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        )
        if kind == expected:
            self._handle_vote_response(m)

    def _step_follower(self, m: Message) -> None:
        kind = MessageType(m.type)
        handler = self._follower_handlers.get(kind)
        if handler is None:
            return
        if kind in _LEADER_TRAFFIC:
            self.election_elapsed = 0
            self.lead = m.src
            self.leader_contact = 0
        handler(m)

    # -- follower handlers ---------------------------------------------------------

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self.send(MessageType.APPEND_RESP, m.src, index=self.log.committed)
            return
        try:
            appended = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        except LogConflictError:
            self.dropped_messages += 1
            return
        if appended is not None:
            last_new, replaced = appended
            if replaced:
                self._retract_acks(replaced)
            self.send(MessageType.APPEND_RESP, m.src, index=last_new)
            return
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self.send(
            MessageType.APPEND_RESP,
            m.src,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader sends min(our acked match, its commit); our log agrees with it
        # up to there. A commit beyond our log can only come from a faulty peer.
        if m.commit <= self.log.last_index():
            self.log.commit_to(m.commit)
        self.send(MessageType.HEARTBEAT_RESP, m.src, context=m.context)

    def _handle_snapshot(self, m: Message) -> None:
        snapshot = m.snapshot
        if snapshot is None:
            return
        meta = snapshot.meta
        if meta.index <= self.log.committed:
            pass  # nothing new: just report how far we are
        elif self.log.match_term(meta.index, meta.term):
            # Our log already holds the snapshot's last entry: keep the log and its
            # suffix, commit up to it (hashicorp/raft#704: never keep a *conflicting*
            # entry, or the follower rejects every append and livelocks on snapshots).
            self.log.commit_to(meta.index)
        else:
            self._retract_acks(self.log.committed + 1)
            self.log.restore(snapshot)
            self.membership.reset(meta.conf)
        self.send(MessageType.APPEND_RESP, m.src, index=self.log.committed)

    def _retract_acks(self, first_replaced: int) -> None:
        """Drops queued acks of entries that were just replaced in memory.

        An ack is released only after the next Ready is persisted, and that Ready
        will no longer contain these entries: sent, the ack would claim durable
        entries this node never wrote (a leader of an older term could count it).
        Acks already handed out in a Ready stay true: that Ready persists them first.
        """
        self.msgs = [
            m
            for m in self.msgs
            if m.type != MessageType.APPEND_RESP or m.reject or m.index < first_replaced
        ]

    def _handle_timeout_now(self, m: Message) -> None:
        if m.src == self.lead:
            self.campaign(transfer=True)

    def _handle_read_index_resp(self, m: Message) -> None:
        if m.src == self.lead:
            self.read_states.append(ReadState(m.index, m.context))

    # -- requests from the driver --------------------------------------------------

    def _leadership(self) -> Leadership:
        if self.leadership is None:
            raise ProposalDropped(f"not the leader (leader is {self.lead or 'unknown'})")
        return self.leadership

    def propose(self, datas: list[bytes]) -> list[int]:
        return self._leadership().propose(datas)

    def propose_conf_change(self, change: ConfChange) -> int:
        return self._leadership().propose_conf_change(change)

    def conf_change_refusal(self, change: ConfChange) -> str | None:
        return self.membership.refusal(change)

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        conf = self.membership.apply(change)
        if self.leadership is not None and not self.leadership.on_conf_change():
            self._become_follower(self.term, 0)
        return conf

    def read_index(self, context: bytes) -> None:
        if self.leadership is not None:
            self.leadership.read_index(self.id, context)
        elif self.lead:
            self.send(MessageType.READ_INDEX, self.lead, context=context)
        else:
            raise ReadIndexDropped("no leader known")

    def transfer_leader(self, to: int) -> None:
        leadership = self._leadership()
        if to == self.id:
            return
        if to not in self.membership.voters:
            raise ValueError(f"node {to} is not a voter")
        leadership.transfer(to)

    def on_advance(self) -> None:
        if self.leadership is not None:
            self.leadership.self_ack()

    def status(self) -> Status:
        leadership = self.leadership
        contact = leadership.quorum_contact_age() if leadership else self.leader_contact
        return Status(
            id=self.id,
            term=self.term,
            vote=self.vote,
            commit=self.log.committed,
            applied=self.log.applied,
            role=self.role,
            leader=self.lead,
            conf=self.membership.conf_state(),
            progress=leadership.peer_status() if leadership else {},
            ticks_since_leader_contact=contact,
            lead_transferee=leadership.transferee if leadership else 0,
            dropped_messages=self.dropped_messages,
        )
