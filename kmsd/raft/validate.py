"""Structural checks on peer messages before the core acts on them.

A peer's message is untrusted input: anything malformed is dropped (and counted)
rather than raising or being half-applied. These checks are about shape only
(types, ranges, internal consistency); whether a well-formed message is stale or
applicable is the core's business.
"""

from __future__ import annotations

from enum import IntEnum

from .types import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

MAX_U64 = (1 << 64) - 1

# Types that only a leader (or a candidate) sends; a node accepts these even from an
# id it does not know yet, because its applied membership may lag (thesis §4.2.1).
CAMPAIGN_AND_LEADER_TYPES = frozenset(
    {
        MessageType.APPEND,
        MessageType.HEARTBEAT,
        MessageType.SNAPSHOT,
        MessageType.PRE_VOTE,
        MessageType.VOTE,
    }
)
_RESPONSE_TYPES = frozenset(
    {
        MessageType.PRE_VOTE_RESP,
        MessageType.VOTE_RESP,
        MessageType.APPEND_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.READ_INDEX_RESP,
    }
)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_U64


def _is_id(value: object) -> bool:
    return _is_u64(value) and value != 0


def _is_member(value: object, enum: type[IntEnum]) -> bool:
    if type(value) is enum:
        return True
    return type(value) is int and value in enum._value2member_map_


def check_message(m: Message, self_id: int) -> str | None:
    """Why `m` is malformed for node `self_id`, or None if it is well formed."""
    if not isinstance(m, Message):
        return "not a Message"
    if not _is_member(m.type, MessageType):
        return "unknown message type"
    if not (_is_id(m.src) and _is_id(m.dst)):
        return "bad node id"
    if m.dst != self_id or m.src == self_id:
        return "misaddressed"
    for name in ("term", "log_term", "index", "commit", "reject_hint"):
        if not _is_u64(getattr(m, name)):
            return f"bad {name}"
    if type(m.reject) is not bool or type(m.context) is not bytes:
        return "bad reject or context"
    if type(m.entries) is not tuple:
        return "bad entries"
    if m.term == 0 and MessageType(m.type) not in _RESPONSE_TYPES:
        return "a request needs a term"
    if m.log_term > m.term:
        return "log_term beyond term"
    return _check_by_type(m)


def _check_by_type(m: Message) -> str | None:
    kind = MessageType(m.type)
    if kind != MessageType.APPEND and m.entries:
        return "entries on a non-append"
    if kind != MessageType.SNAPSHOT and m.snapshot is not None:
        return "snapshot on a non-snapshot message"
    if kind == MessageType.APPEND:
        return _check_append(m)
    if kind == MessageType.SNAPSHOT:
        return _check_snapshot(m.snapshot, m.term)
    if kind == MessageType.APPEND_RESP and m.reject and m.reject_hint > m.index:
        return "reject hint beyond the rejected index"
    return None


def _check_append(m: Message) -> str | None:
    if m.index == 0 and m.log_term != 0:
        return "a term for index 0"
    previous_term = m.log_term
    for offset, entry in enumerate(m.entries, start=1):
        reason = _check_entry(entry, m.index + offset, m.term)
        if reason:
            return reason
        if entry.term < previous_term:
            return "entry terms decrease"
        previous_term = entry.term
    return None


def _check_entry(entry: object, index: int, max_term: int) -> str | None:
    if not isinstance(entry, Entry):
        return "not an Entry"
    if entry.index != index or not _is_u64(entry.index):
        return "entry index out of sequence"
    if not _is_id(entry.term) or entry.term > max_term:
        return "bad entry term"
    if not _is_member(entry.type, EntryType) or type(entry.data) is not bytes:
        return "bad entry type or data"
    if entry.type == EntryType.CONF_CHANGE:
        try:
            ConfChange.decode(entry.data)
        except ValueError:
            return "undecodable conf change"
    return None


def _check_snapshot(snapshot: object, max_term: int) -> str | None:
    if not isinstance(snapshot, Snapshot):
        return "snapshot missing"
    meta = snapshot.meta
    if not isinstance(meta, SnapshotMeta):
        return "bad snapshot meta"
    if not (_is_id(meta.index) and _is_id(meta.term)) or meta.term > max_term:
        return "bad snapshot index or term"
    if type(snapshot.data) is not bytes:
        return "bad snapshot data"
    return _check_conf(meta.conf)


def _check_conf(conf: object) -> str | None:
    if not isinstance(conf, ConfState):
        return "bad snapshot conf"
    if any(type(ids) is not frozenset for ids in (conf.voters, conf.learners, conf.removed)):
        return "bad snapshot conf"
    members = conf.voters | conf.learners
    if not conf.voters or conf.voters & conf.learners or members & conf.removed:
        return "snapshot conf without voters or with overlaps"
    if not all(_is_id(n) for n in members | conf.removed):
        return "bad id in snapshot conf"
    return None
