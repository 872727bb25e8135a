"""Safety invariants of reference/replication.md §3.4, checked incrementally by simnet.

`Checker` keeps global records (leaders per term, granted votes, every entry seen
at an (index, term), every committed entry, the state digest at every applied
index, the membership at every applied conf change and installed snapshot, the
commit floor of every read) and checks each event against them.
`StateMachine` is the replicated model: a list of values with a rolling digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from kmsd.raft import (
    CompactedError,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Role,
)

if TYPE_CHECKING:
    from simnet import SimNode


class InvariantViolation(AssertionError):
    """A safety invariant failed."""


def _chain(previous: bytes, entry: Entry) -> bytes:
    h = hashlib.blake2b(previous, digest_size=8)
    h.update(entry.index.to_bytes(8, "big") + entry.term.to_bytes(8, "big"))
    h.update(bytes([int(entry.type)]) + entry.data)
    return h.digest()


class StateMachine:
    """A replicated list of values with a rolling digest over every applied entry."""

    def __init__(self) -> None:
        self.index = 0
        self.digest = bytes(8)
        self.values: list[bytes] = []

    def apply(self, entry: Entry) -> None:
        if entry.index != self.index + 1:
            raise InvariantViolation(f"applied {entry.index} after {self.index}")
        self.digest = _chain(self.digest, entry)
        self.index = entry.index
        if entry.type == EntryType.NORMAL:
            self.values.append(entry.data)

    def snapshot(self) -> bytes:
        return json.dumps([self.index, self.digest.hex(), [v.hex() for v in self.values]]).encode()

    @classmethod
    def restore(cls, data: bytes) -> StateMachine:
        sm = cls()
        if data:
            index, digest, values = json.loads(data)
            sm.index, sm.digest = index, bytes.fromhex(digest)
            sm.values = [bytes.fromhex(v) for v in values]
        return sm


class Checker:
    """Global safety invariants, checked incrementally (replication.md §3.4)."""

    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}  # term -> node (election safety)
        self.entries: dict[tuple[int, int], tuple[int, bytes, int]] = {}  # log matching
        self.committed: dict[int, tuple[int, int, bytes]] = {}  # index -> term, type, data
        self.max_committed = 0
        self.commit_terms: dict[int, int] = {}  # index -> a term it was known committed in
        self.digests: dict[int, bytes] = {}  # applied index -> state digest
        self.confs: dict[int, ConfState] = {}  # applied index -> membership
        self.terms: dict[int, HardState] = {}  # node -> last synced hard state
        self.reads: dict[bytes, int] = {}  # read context -> committed floor at issue
        self.reads_served = 0
        self.votes: dict[tuple[int, int], int] = {}  # (voter, term) -> candidate
        self.leader_changes = 0
        self.commits = 0

    def fail(self, what: str) -> None:
        raise InvariantViolation(what)

    # election safety + leader completeness
    def observe(self, node: SimNode) -> None:
        raw = node.raw
        if raw is None or raw.soft_state().role != Role.LEADER:
            return
        term = raw.term
        holder = self.leaders.get(term)
        if holder is None:
            self.leaders[term] = node.id
            self.leader_changes += 1
            self._check_leader_complete(node)
        elif holder != node.id:
            self.fail(f"two leaders in term {term}: {holder} and {node.id}")

    def _check_leader_complete(self, node: SimNode) -> None:
        assert node.raw is not None
        log = node.raw._raft.log
        first, last = log.first_index(), log.last_index()
        for index in range(max(first, 1), self.max_committed + 1):
            record = self.committed.get(index)
            # Completeness covers entries committed in an earlier term: a leader of
            # term 2 may legitimately be elected after a term-3 leader committed.
            if record is None or self.commit_terms[index] >= node.raw.term:
                continue
            if index > last or log.term_or_none(index) != record[0]:
                self.fail(f"leader {node.id} lacks committed entry {index}")

    # log matching and committed-entry stability, on every persisted batch
    def before_append(self, node: SimNode, entries: list[Entry]) -> None:
        storage = node.storage
        commit = storage.hard_state.commit
        for entry in entries:
            if entry.index > commit:
                break
            stored = storage.first_index() <= entry.index <= storage.last_index()
            if stored and storage.term(entry.index) != entry.term:
                self.fail(f"node {node.id} rewrites committed entry {entry.index}")

    def after_append(self, node: SimNode, entries: list[Entry]) -> None:
        storage = node.storage
        for entry in entries:
            try:
                prev_term = storage.term(entry.index - 1)
            except CompactedError:
                prev_term = -1
            key = (entry.index, entry.term)
            value = (int(entry.type), entry.data, prev_term)
            known = self.entries.setdefault(key, value)
            if known[:2] != value[:2] or (
                known[2] != prev_term and -1 not in (known[2], prev_term)
            ):
                self.fail(f"log matching broken at {key} on node {node.id}")

    def on_hard_state(self, node: SimNode, old: HardState, new: HardState) -> None:
        if new.term < old.term:
            self.fail(f"node {node.id} term went back {old.term} -> {new.term}")
        if new.term == old.term and old.vote and new.vote != old.vote:
            self.fail(f"node {node.id} changed its vote in term {new.term}")
        if new.commit < old.commit:
            self.fail(f"node {node.id} commit went back {old.commit} -> {new.commit}")

    def on_commit_range(self, node: SimNode, old: int, new: int) -> None:
        storage = node.storage
        if new > storage.last_index():
            self.fail(f"node {node.id} commit {new} beyond its durable log")
        for index in range(max(old + 1, storage.first_index()), new + 1):
            [entry] = storage.entries(index, index + 1)
            self.record_committed(node, entry)

    def record_committed(self, node: SimNode, entry: Entry) -> None:
        value = (entry.term, int(entry.type), entry.data)
        known = self.committed.setdefault(entry.index, value)
        # The recorder's current term bounds the term the entry was committed in.
        term = node.raw.term if node.raw is not None else entry.term
        self.commit_terms[entry.index] = min(self.commit_terms.get(entry.index, term), term)
        if known != value:
            self.fail(f"committed entry {entry.index} differs on node {node.id}")
        if entry.index > self.max_committed:
            self.max_committed = entry.index
            self.commits += 1

    # state machine safety
    def on_applied(self, node: SimNode) -> None:
        known = self.digests.setdefault(node.sm.index, node.sm.digest)
        if known != node.sm.digest:
            self.fail(f"node {node.id} state differs at applied index {node.sm.index}")

    # membership safety: applying the same log gives every node the same membership
    # (removed ids included: a skipped change must be skipped everywhere), and a
    # removed id is never a member again
    def on_membership(self, node: SimNode, index: int, conf: ConfState) -> None:
        known = self.confs.setdefault(index, conf)
        if known != conf:
            self.fail(f"node {node.id} membership at {index} is {conf}, another's {known}")
        if conf.removed & (conf.voters | conf.learners):
            self.fail(f"node {node.id}: a removed id is a member again at {index}: {conf}")

    # durability before send
    def on_send(self, node: SimNode, m: Message) -> None:
        synced = node.synced
        pre_vote = m.type in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP)
        if not pre_vote and m.term > synced.term:
            self.fail(f"node {node.id} sent term {m.term} before persisting it")
        if m.type == MessageType.VOTE_RESP and not m.reject:
            # Durable: the vote itself, or a later term (then no other vote in m.term
            # can ever follow, even after a restart).
            if synced.term < m.term or (synced.term == m.term and synced.vote != m.dst):
                self.fail(f"node {node.id} granted a vote it has not persisted")
            voted = self.votes.setdefault((node.id, m.term), m.dst)
            if voted != m.dst:
                self.fail(f"node {node.id} voted for {voted} and {m.dst} in term {m.term}")
        if (
            m.type == MessageType.APPEND_RESP
            and not m.reject
            and m.index > node.storage.last_index()
        ):
            self.fail(f"node {node.id} acked {m.index} before persisting it")

    def on_restart(self, node: SimNode) -> None:
        assert node.raw is not None
        before = self.terms.get(node.id)
        if before is not None and node.raw.term < before.term:
            self.fail(f"node {node.id} restarted at term {node.raw.term} < {before.term}")

    def on_synced(self, node: SimNode) -> None:
        self.terms[node.id] = node.synced

    # linearizable reads
    def on_read_issued(self, context: bytes) -> None:
        self.reads[context] = self.max_committed

    def on_read_state(self, node: SimNode, index: int, context: bytes) -> None:
        floor = self.reads.get(context)
        if floor is None:
            self.fail(f"node {node.id} got an unknown read {context!r}")
        elif index < floor:
            self.fail(f"read {context!r} at {index} misses committed {floor}")
        self.reads_served += 1
