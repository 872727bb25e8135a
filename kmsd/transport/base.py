"""The seam between a Raft driver and the network that carries its messages.

A transport delivers outgoing `Message`s to peers (best effort: Raft tolerates
loss, duplication and reordering), hands incoming ones to its `PeerHandler`, and
carries the one request a follower makes of the leader: forwarding a proposal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from kmsd.errors import UnavailableError
from kmsd.log.raft_disk import Member
from kmsd.raft import Message


class LeaderUnreachable(UnavailableError):
    """`Transport.forward` could not reach the leader, or it is no longer the leader:
    gRPC's UNAVAILABLE. The proposal normally did not get there; it may have only if
    the connection broke mid-call, which the command's request_id covers as it does a
    client's own retry. The driver waits for a new leader and forwards again."""


class Overloaded(UnavailableError):
    """The leader refused a proposal because too many are queued: shed load, do not
    wait for another leader."""


class PeerHandler(Protocol):
    """What a transport delivers to (implemented by `RaftLog`)."""

    def receive(self, message: Message) -> None:
        """A message from a peer (snapshots arrive whole, data included)."""
        ...

    async def accept_forwarded(self, envelope: bytes) -> int:
        """A follower's proposal; returns the index it was appended at, or raises
        `UnavailableError` when this node is not the leader."""
        ...

    def report_unreachable(self, node_id: int) -> None:
        """Sending to `node_id` failed."""
        ...

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        """Streaming a snapshot to `node_id` finished or failed."""
        ...


class Transport(Protocol):
    """Carries Raft traffic for one node."""

    def bind(self, handler: PeerHandler) -> None:
        """Sets where incoming traffic goes; called once, before `start`."""
        ...

    def set_members(self, members: Mapping[int, Member]) -> None:
        """The current members and their addresses (changes as the cluster does)."""
        ...

    def send(self, messages: Sequence[Message]) -> None:
        """Queues messages for their destinations; never blocks, never raises."""
        ...

    def hurry(self, node_id: int) -> None:
        """Sends what is queued for `node_id` now: it waits for it (a transport may
        otherwise hold back messages that delay nobody, to batch them)."""
        ...

    async def forward(self, leader_id: int, envelope: bytes, timeout: float) -> int:
        """Asks the leader to propose `envelope`; returns its index. Raises
        `LeaderUnreachable` if the leader cannot be reached or is no longer the leader,
        `UnavailableError` for other failures (e.g. a timeout)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
