"""Linearizable reads by ReadIndex (thesis §6.4): pending requests awaiting a heartbeat quorum.

The leader records its commit index for each request, tags the next heartbeat
round with the request's sequence number, and releases the request once a quorum
of voters echoed a tag >= it: a quorum then acknowledged this node as leader
after the request arrived, so no newer leader can have committed anything the
recorded index misses. Sequence numbers are private to one leadership.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

_SEQ = struct.Struct(">Q")


def encode_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def decode_seq(context: bytes) -> int | None:
    """The sequence number in a heartbeat context, or None if it is not one."""
    if len(context) != _SEQ.size:
        return None
    return int(_SEQ.unpack(context)[0])


@dataclass
class ReadRequest:
    """One read-index request: who asked, with what context, at what commit index."""

    seq: int
    index: int
    origin: int
    context: bytes
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    """Pending read-index requests of one leadership, in arrival order."""

    def __init__(self) -> None:
        self._pending: dict[int, ReadRequest] = {}
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, index: int, origin: int, context: bytes) -> ReadRequest:
        request = ReadRequest(self._next_seq, index, origin, context)
        self._next_seq += 1
        self._pending[request.seq] = request
        return request

    def last_seq(self) -> int | None:
        return next(reversed(self._pending), None)

    def ack(self, voter: int, seq: int) -> set[int] | None:
        """Records that `voter` answered a heartbeat tagged `seq`; returns its acks."""
        request = self._pending.get(seq)
        if request is None:
            return None
        request.acks.add(voter)
        return request.acks

    def release_through(self, seq: int) -> list[ReadRequest]:
        """Removes and returns every request up to and including `seq`."""
        released = [r for s, r in self._pending.items() if s <= seq]
        for request in released:
            del self._pending[request.seq]
        return released
