"""Raft core values <-> `kms.raft.v1` protobufs, for the wire and the WAL.

Decoding is where untrusted peer input enters: anything malformed (unknown
message type, negative-free but absurd fields are left to the core's own
checks) raises `ValueError`, and the transport drops that message.
"""

from __future__ import annotations

from kms.raft.v1 import raft_service_pb2 as wire
from kms.raft.v1 import wal_pb2

from kmsd.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)


def entry_to_proto(entry: Entry) -> wal_pb2.Entry:
    return wal_pb2.Entry(
        index=entry.index,
        term=entry.term,
        type=int(entry.type),  # type: ignore[arg-type]
        data=entry.data,
    )


def entry_from_proto(entry: wal_pb2.Entry) -> Entry:
    if entry.type not in EntryType._value2member_map_:
        raise ValueError(f"unknown entry type {entry.type}")
    return Entry(entry.index, entry.term, EntryType(entry.type), entry.data)


def hard_state_to_proto(state: HardState) -> wal_pb2.HardState:
    return wal_pb2.HardState(term=state.term, vote=state.vote, commit=state.commit)


def hard_state_from_proto(state: wal_pb2.HardState) -> HardState:
    return HardState(term=state.term, vote=state.vote, commit=state.commit)


def conf_to_proto(conf: ConfState) -> wal_pb2.ConfState:
    """A membership, removed ids included (snapshot files and InstallSnapshot)."""
    return wal_pb2.ConfState(
        voters=sorted(conf.voters), learners=sorted(conf.learners), removed=sorted(conf.removed)
    )


def conf_from_proto(proto: wal_pb2.ConfState) -> ConfState:
    """`conf_to_proto`'s inverse. A snapshot written, or a peer running, before removed
    ids were recorded sends none; an id listed as a member is not removed."""
    members = frozenset(proto.voters) | frozenset(proto.learners)
    return ConfState(
        voters=frozenset(proto.voters),
        learners=frozenset(proto.learners),
        removed=frozenset(proto.removed) - members,
    )


def message_to_proto(message: Message) -> wire.Message:
    """The wire form; a snapshot's data is not included (it is streamed separately)."""
    proto = wire.Message(
        type=int(message.type),  # type: ignore[arg-type]
        to=message.dst,
        term=message.term,
        log_term=message.log_term,
        index=message.index,
        entries=[entry_to_proto(e) for e in message.entries],
        commit=message.commit,
        reject=message.reject,
        reject_hint=message.reject_hint,
        context=message.context,
    )
    setattr(proto, "from", message.src)  # "from" is a Python keyword
    if message.snapshot is not None:
        meta = message.snapshot.meta
        proto.snapshot.CopyFrom(
            wire.SnapshotMetadata(index=meta.index, term=meta.term, conf=conf_to_proto(meta.conf))
        )
    return proto


def message_from_proto(proto: wire.Message, snapshot_data: bytes | None = None) -> Message:
    if proto.type not in MessageType._value2member_map_:
        raise ValueError(f"unknown message type {proto.type}")
    snapshot = None
    if proto.HasField("snapshot"):
        meta = proto.snapshot
        snapshot = Snapshot(
            SnapshotMeta(meta.index, meta.term, conf_from_proto(meta.conf)),
            snapshot_data or b"",
        )
    return Message(
        type=MessageType(proto.type),
        src=getattr(proto, "from"),
        dst=proto.to,
        term=proto.term,
        log_term=proto.log_term,
        index=proto.index,
        entries=tuple(entry_from_proto(e) for e in proto.entries),
        commit=proto.commit,
        reject=proto.reject,
        reject_hint=proto.reject_hint,
        snapshot=snapshot,
        context=proto.context,
    )
