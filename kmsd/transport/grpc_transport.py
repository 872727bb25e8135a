"""Raft over gRPC (`kms.raft.v1.RaftService`) on the node's peer port.

Sending: one queue and one task per peer, so a slow or dead peer never delays the
others; each task sends its queue in batches with a deadline, and reports the peer
unreachable to Raft when a batch fails (the batch is dropped: Raft retransmits).
Snapshots are streamed in chunks by `InstallSnapshot`, with their size and CRC32C
checked before the receiver hands them to Raft.

Receiving: peer input is untrusted. A message that does not decode, names another
cluster, or claims a sender that is not a member is dropped and counted, never
raised into the core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import google_crc32c
import grpc
from kms.raft.v1 import raft_service_pb2 as wire
from kms.raft.v1 import raft_service_pb2_grpc as wire_grpc

from kmsd.errors import UnavailableError
from kmsd.grpc_parsing import parsing_handler
from kmsd.log.raft_disk import Member
from kmsd.raft import Message, MessageType
from kmsd.transport.base import PeerHandler
from kmsd.transport.codec import message_from_proto, message_to_proto

log = logging.getLogger(__name__)

MAX_PEER_MESSAGE_BYTES = 64 * 1024 * 1024
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
SEND_TIMEOUT_S = 2.0
MAX_BATCH = 256
MAX_QUEUE = 8192
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_PEER_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_PEER_MESSAGE_BYTES),
]


class _Peer:
    """The sending side of one peer: a channel, a queue and the task draining it."""

    def __init__(self, transport: GrpcTransport, member: Member) -> None:
        self.member = member
        self._transport = transport
        self.channel = grpc.aio.insecure_channel(member.peer_address, options=_OPTIONS)
        self.stub = wire_grpc.RaftServiceStub(self.channel)
        self.queue: asyncio.Queue[Message] = asyncio.Queue(MAX_QUEUE)
        self.task = asyncio.create_task(self._drain(), name=f"raft-send-{member.id}")

    def put(self, message: Message) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self._transport.dropped += 1  # Raft retransmits what matters

    async def _drain(self) -> None:
        while True:
            first = await self.queue.get()
            if first.type == MessageType.SNAPSHOT:
                await self._send_snapshot(first)
                continue
            batch = [first]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                message = self.queue.get_nowait()
                if message.type == MessageType.SNAPSHOT:
                    await self._send_batch(batch)
                    batch = []
                    await self._send_snapshot(message)
                    continue
                batch.append(message)
            if batch:
                await self._send_batch(batch)

    async def _send_batch(self, batch: list[Message]) -> None:
        request = wire.SendRequest(
            cluster_id=self._transport.cluster_id,
            messages=[message_to_proto(m) for m in batch],
        )
        try:
            await self.stub.Send(request, timeout=SEND_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            log.debug("send to node %d failed: %s", self.member.id, error.code().name)
            self._transport.handler.report_unreachable(self.member.id)

    async def _send_snapshot(self, message: Message) -> None:
        assert message.snapshot is not None
        data = message.snapshot.data
        header = wire.SnapshotHeader(
            cluster_id=self._transport.cluster_id,
            message=message_to_proto(message),
            size=len(data),
            crc32c=google_crc32c.value(data),
        )

        async def parts() -> AsyncIterator[wire.InstallSnapshotRequest]:
            yield wire.InstallSnapshotRequest(header=header)
            for start in range(0, len(data), SNAPSHOT_CHUNK_BYTES):
                yield wire.InstallSnapshotRequest(chunk=data[start : start + SNAPSHOT_CHUNK_BYTES])

        ok = True
        try:
            await self.stub.InstallSnapshot(parts(), timeout=60)
        except grpc.aio.AioRpcError as error:
            log.warning("snapshot to node %d failed: %s", self.member.id, error.code().name)
            ok = False
        self._transport.handler.report_snapshot(self.member.id, ok)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


class GrpcTransport(wire_grpc.RaftServiceServicer):
    """A node's Raft traffic over gRPC; see the module docstring."""

    def __init__(self, node_id: int, listen: str, cluster_id: str) -> None:
        self.node_id = node_id
        self.listen = listen
        self.cluster_id = cluster_id
        self.port = 0
        self.dropped = 0
        self._handler: PeerHandler | None = None
        self._members: dict[int, Member] = {}
        self._peers: dict[int, _Peer] = {}
        self._server: grpc.aio.Server | None = None

    @property
    def handler(self) -> PeerHandler:
        assert self._handler is not None
        return self._handler

    # -- Transport ------------------------------------------------------------------

    def bind(self, handler: PeerHandler) -> None:
        self._handler = handler

    def set_members(self, members: Mapping[int, Member]) -> None:
        self._members = dict(members)
        if self._server is None:
            return  # peers are connected on start
        for node_id in list(self._peers):
            current = self._members.get(node_id)
            if current is None or current != self._peers[node_id].member:
                asyncio.create_task(self._peers.pop(node_id).close())
        for node_id, member in self._members.items():
            if node_id != self.node_id and node_id not in self._peers:
                self._peers[node_id] = _Peer(self, member)

    def send(self, messages: Sequence[Message]) -> None:
        for message in messages:
            peer = self._peers.get(message.dst)
            if peer is None:
                self.dropped += 1
                self.handler.report_unreachable(message.dst)
                if message.type == MessageType.SNAPSHOT:
                    # Raft keeps a follower in snapshot state until told how it went.
                    self.handler.report_snapshot(message.dst, False)
            else:
                peer.put(message)

    async def forward(self, leader_id: int, envelope: bytes, timeout: float) -> int:
        peer = self._peers.get(leader_id)
        if peer is None:
            raise UnavailableError(f"the leader (node {leader_id}) is not a known member")
        try:
            response = await peer.stub.Propose(
                wire.ProposeRequest(cluster_id=self.cluster_id, command=envelope),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise UnavailableError(
                f"forwarding to the leader (node {leader_id}) failed: {error.details()}"
            ) from None
        return response.index

    async def start(self) -> None:
        server = grpc.aio.server(options=_OPTIONS)
        service = wire.DESCRIPTOR.services_by_name["RaftService"]
        server.add_generic_rpc_handlers((parsing_handler(service, wire, self, self._bad_request),))
        self.port = server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        self._server = server
        self.set_members(self._members)

    async def stop(self) -> None:
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    # -- RaftService (the receiving side) --------------------------------------------------

    async def _bad_request(self, context: grpc.aio.ServicerContext[Any, Any], name: str) -> None:
        self.dropped += 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {name}")

    def _accept(self, proto: wire.Message, data: bytes | None = None) -> Message | None:
        try:
            message = message_from_proto(proto, data)
        except ValueError:
            self.dropped += 1
            return None
        # Until peers authenticate with mTLS, at least refuse senders that are not
        # members: a message from an unknown id with a high term would depose a leader.
        if message.dst != self.node_id or message.src == self.node_id:
            self.dropped += 1
            return None
        if message.src not in self._members:
            self.dropped += 1
            return None
        return message

    async def Send(
        self, request: wire.SendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> wire.SendResponse:
        if request.cluster_id != self.cluster_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong cluster id")
        for proto in request.messages:
            if proto.type == wire.MESSAGE_TYPE_SNAPSHOT:
                self.dropped += 1  # snapshots only travel through InstallSnapshot
                continue
            message = self._accept(proto)
            if message is not None:
                self.handler.receive(message)
        return wire.SendResponse()

    async def InstallSnapshot(
        self,
        request_iterator: AsyncIterator[wire.InstallSnapshotRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> wire.InstallSnapshotResponse:
        header: wire.SnapshotHeader | None = None
        chunks: list[bytes] = []
        received = 0
        async for part in request_iterator:
            if part.HasField("header"):
                header = part.header
                if header.cluster_id != self.cluster_id or header.size > MAX_PEER_MESSAGE_BYTES:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad snapshot header")
            elif header is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk before header")
            else:
                received += len(part.chunk)
                if received > header.size:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "snapshot too long")
                chunks.append(part.chunk)
        if header is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty snapshot stream")
        assert header is not None
        data = b"".join(chunks)
        if len(data) != header.size or google_crc32c.value(data) != header.crc32c:
            await context.abort(grpc.StatusCode.DATA_LOSS, "snapshot size or CRC mismatch")
        message = self._accept(header.message, data)
        if message is None or message.type != MessageType.SNAPSHOT or message.snapshot is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a snapshot message")
        assert message is not None
        self.handler.receive(message)
        return wire.InstallSnapshotResponse()

    async def Propose(
        self, request: wire.ProposeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> wire.ProposeResponse:
        if request.cluster_id != self.cluster_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong cluster id")
        try:
            index = await self.handler.accept_forwarded(request.command)
        except UnavailableError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
        return wire.ProposeResponse(index=index)
