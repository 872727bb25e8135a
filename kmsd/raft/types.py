"""The value types of the Raft core: entries, messages, states, the Ready batch, Status.

Everything here is an immutable value (frozen dataclass or IntEnum) made only of
ints, bytes, tuples and frozensets, so the driver can map each one 1:1 onto the
protobuf types of `protos/kms/raft/v1/` and the core never sees a wire object.
`EntryType` uses the numbers of `kms.raft.v1.EntryType` (wal.proto): they are on disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum


class EntryType(IntEnum):
    """What an entry's data is; numbers match `kms.raft.v1.EntryType` (on-disk format)."""

    NORMAL = 1
    NOOP = 2
    CONF_CHANGE = 3


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. Indexes start at 1 and are dense."""

    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before a node sends anything: term, vote (0 = none), commit."""

    term: int = 0
    vote: int = 0
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """A membership: voters elect and form quorums, learners only receive the log.

    `removed` holds every id removed up to this point (disjoint from the members):
    ids are never reused, so it travels with the membership, snapshots included.
    """

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()
    removed: frozenset[int] = frozenset()


class ConfChangeType(IntEnum):
    """A single-server membership change. ADD_VOTER on a learner promotes it."""

    ADD_VOTER = 1
    ADD_LEARNER = 2
    REMOVE_NODE = 3


_CC_VERSION = 1
_CC_HEADER = struct.Struct(">BBQ")  # version, type, node id; the context follows


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change, stored as the data of a CONF_CHANGE entry.

    `context` is opaque to the core (e.g. the node's address for the driver).
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        """Serializes to the stable byte form stored in the log."""
        return _CC_HEADER.pack(_CC_VERSION, int(self.type), self.node_id) + self.context

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Parses `encode`'s output; raises ValueError on anything else."""
        if len(data) < _CC_HEADER.size:
            raise ValueError("conf change: too short")
        version, kind, node_id = _CC_HEADER.unpack_from(data)
        if version != _CC_VERSION:
            raise ValueError(f"conf change: unknown version {version}")
        if kind not in ConfChangeType._value2member_map_:
            raise ValueError(f"conf change: unknown type {kind}")
        if node_id <= 0:
            raise ValueError("conf change: node id must be positive")
        return cls(ConfChangeType(kind), node_id, bytes(data[_CC_HEADER.size :]))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log and the membership as of that index."""

    index: int
    term: int
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine image covering the log up to `meta.index`; `data` is opaque."""

    meta: SnapshotMeta
    data: bytes = b""


class MessageType(IntEnum):
    """Peer message types. Every one travels on the wire; there are no local-only ones."""

    PRE_VOTE = 1
    PRE_VOTE_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    TIMEOUT_NOW = 10
    READ_INDEX = 11
    READ_INDEX_RESP = 12


@dataclass(frozen=True, slots=True)
class Message:
    """A peer message. Field use per type (others stay at their defaults):

    - PRE_VOTE/VOTE: index, log_term = candidate's last entry; context = b"transfer"
      marker on a leadership-transfer campaign. PRE_VOTE's term is the term the
      candidate would campaign in (its own + 1).
    - *_VOTE_RESP: reject; a granted pre-vote echoes the requested term.
    - APPEND: index, log_term = the entry before `entries`; commit = leader's commit.
    - APPEND_RESP: index = last index matched (or the rejected index when reject),
      reject_hint/log_term = where the follower suggests the leader probe next.
    - HEARTBEAT: commit; context = read-index round id. HEARTBEAT_RESP echoes context.
    - SNAPSHOT: snapshot. READ_INDEX: context. READ_INDEX_RESP: index, context.
    """

    type: MessageType
    src: int
    dst: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


class Role(IntEnum):
    """A node's role in its current term."""

    FOLLOWER = 1
    PRE_CANDIDATE = 2
    CANDIDATE = 3
    LEADER = 4


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to observe; never persisted."""

    leader: int
    role: Role


@dataclass(frozen=True, slots=True)
class ReadState:
    """A confirmed linearizable read: serve `context`'s read once applied >= index."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """A batch of work for the driver; see `kmsd.raft.rawnode` for the contract.

    `early_send_ok` is True when `messages` may leave before this batch is fsynced
    (thesis §10.2.1): term and vote did not change and no message acknowledges
    entries or grants a vote. It is safe because a leader counts its own entries
    towards a quorum only in `advance()`, i.e. after its own fsync.
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    entries: list[Entry]
    snapshot: Snapshot | None
    committed_entries: list[Entry]
    messages: list[Message]
    read_states: list[ReadState]
    must_sync: bool
    early_send_ok: bool = False


class ProgressState(IntEnum):
    """How a leader replicates to one peer (etcd's flow-control states)."""

    PROBE = 1  # one message per heartbeat until the follower's match is found
    REPLICATE = 2  # pipelined appends, bounded by the in-flight window
    SNAPSHOT = 3  # a snapshot is being streamed; nothing else is sent


@dataclass(frozen=True, slots=True)
class PeerProgress:
    """The leader's view of one peer."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    is_learner: bool
    pending_snapshot: int
    inflight: int
    ticks_since_active: int


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of a node's state for monitoring and for the driver's decisions.

    `ticks_since_leader_contact`: on a follower, ticks since the current leader was
    last heard from; on a leader, ticks since a quorum of voters last answered
    (the age of the leader's own authority); None when no leader is known.
    `progress` is empty unless this node is the leader.
    """

    id: int
    term: int
    vote: int
    commit: int
    applied: int
    role: Role
    leader: int
    conf: ConfState
    progress: dict[int, PeerProgress]
    ticks_since_leader_contact: int | None
    lead_transferee: int
    dropped_messages: int
