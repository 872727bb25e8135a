"""An in-process network of Raft transports, for cluster tests without sockets.

A real implementation of `Transport`, not a mock: messages are delivered
asynchronously (on the next loop iteration), links can be cut and healed, and a
stopped node's traffic is lost, as on a real network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from kmsd.log.raft_disk import Member
from kmsd.raft import Message, MessageType
from kmsd.transport.base import LeaderUnreachable, PeerHandler


class InMemoryNetwork:
    """Routes messages between the transports of one test cluster."""

    def __init__(self) -> None:
        self._handlers: dict[int, PeerHandler] = {}
        self._cut: set[tuple[int, int]] = set()

    def transport(self, node_id: int) -> InMemoryTransport:
        return InMemoryTransport(self, node_id)

    def isolate(self, node_id: int) -> None:
        """Cuts every link to and from `node_id`."""
        for other in range(1, 1 + max([node_id, *self._handlers])):
            self._cut.update({(node_id, other), (other, node_id)})

    def heal(self) -> None:
        self._cut.clear()

    def linked(self, src: int, dst: int) -> bool:
        return (src, dst) not in self._cut and dst in self._handlers

    def attach(self, node_id: int, handler: PeerHandler) -> None:
        self._handlers[node_id] = handler

    def detach(self, node_id: int) -> None:
        self._handlers.pop(node_id, None)

    def deliver(self, message: Message) -> None:
        if not self.linked(message.src, message.dst):
            return
        handler = self._handlers[message.dst]
        handler.receive(message)
        if message.type == MessageType.SNAPSHOT:
            sender = self._handlers.get(message.src)
            if sender is not None:
                sender.report_snapshot(message.dst, True)

    async def forward(self, src: int, dst: int, envelope: bytes) -> int:
        if not self.linked(src, dst):
            raise LeaderUnreachable(f"node {dst} is unreachable")
        return await self._handlers[dst].accept_forwarded(envelope)


class InMemoryTransport:
    """One node's end of an `InMemoryNetwork`."""

    def __init__(self, network: InMemoryNetwork, node_id: int) -> None:
        self._network = network
        self._node_id = node_id
        self._handler: PeerHandler | None = None

    def bind(self, handler: PeerHandler) -> None:
        self._handler = handler

    def set_members(self, members: Mapping[int, Member]) -> None:
        del members  # routing is by node id

    def send(self, messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        for message in messages:
            loop.call_soon(self._network.deliver, message)

    def hurry(self, node_id: int) -> None:
        del node_id  # nothing is ever held back

    async def forward(self, leader_id: int, envelope: bytes, timeout: float) -> int:
        return await asyncio.wait_for(
            self._network.forward(self._node_id, leader_id, envelope), timeout
        )

    async def start(self) -> None:
        assert self._handler is not None
        self._network.attach(self._node_id, self._handler)

    async def stop(self) -> None:
        self._network.detach(self._node_id)
