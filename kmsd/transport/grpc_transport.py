"""Raft over gRPC (`kms.raft.v1.RaftService`) on the node's peer port.

Sending: one queue and one task per peer, so a slow or dead peer never delays the
others. The task keeps one long-lived `SendStream` call open to its peer and writes
what is queued as one `SendRequest` per batch: a message then costs a stream write,
not a whole unary call (call set-up, headers, a response and the completion hand-offs
between gRPC's threads and the event loop, ≈ 4× the CPU; see docs/performance.md).
Raft needs no answer per message: its own responses come back on the stream the peer
keeps open to us. A write that fails, or stalls for `SEND_TIMEOUT_S` (a black-holed
link), drops its batch, ends the stream and reports the peer unreachable to Raft
(which retransmits); the next batch opens a new stream. A peer that does not
implement `SendStream` (an older version during a rolling upgrade) gets unary `Send`
calls instead for a while. Snapshots are streamed in chunks by `InstallSnapshot`,
with their size and CRC32C checked before the receiver hands them to Raft.

Receiving: peer input is untrusted. A batch naming another cluster ends its call; a
message that does not decode, or claims a sender that is not a member, is dropped and
counted, never raised into the core (`_accept`, the one place that vets a sender).

Security: with a `PeerSecurity` (mutual TLS, kmsd.auth.tls.PeerTls) every channel and
the listening port use the node's certificate, and a call's peer certificate names the
node it comes from: a message whose sender is not that node is dropped, and a call
from a certificate that is no member's (a client's, another cluster's) is refused
with PERMISSION_DENIED, forwarded proposals and snapshots included. Replaced
certificate files take effect for new channels: when they change, the channels to
peers are rebuilt. Without it (the loopback-only plaintext mode) any member id is
believed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import google_crc32c
import grpc
from kms.raft.v1 import raft_service_pb2 as wire
from kms.raft.v1 import raft_service_pb2_grpc as wire_grpc

from kmsd.errors import UnavailableError
from kmsd.grpc_parsing import parsing_handler
from kmsd.log.raft_disk import Member
from kmsd.raft import Message, MessageType
from kmsd.transport.base import LeaderUnreachable, Overloaded, PeerHandler
from kmsd.transport.codec import message_from_proto, message_to_proto

log = logging.getLogger(__name__)

MAX_PEER_MESSAGE_BYTES = 64 * 1024 * 1024
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
# A write (or a unary Send) that takes longer means the link is black-holed or the
# peer stopped reading: give up on the batch and the stream.
SEND_TIMEOUT_S = 2.0
MAX_BATCH = 256
# Entry bytes per SendRequest; well under MAX_PEER_MESSAGE_BYTES (one APPEND carries at
# most the core's max_size_per_msg, 1 MiB, and always at least one entry).
MAX_BATCH_BYTES = 8 * 1024 * 1024
MAX_QUEUE = 8192
# How long an update that only moves a follower's commit index (an APPEND without
# entries) may wait for company. The leader sends one to each follower whenever its
# commit index moves; under load the next APPEND with entries follows within a
# millisecond or two and carries a newer commit index, so the two leave in one write
# and the follower handles one batch (one Ready, one ack) instead of two. Delaying a
# message is always safe in Raft; this one delays no client: the leader answers after
# its own apply, and a follower waiting for the commit of its own forwarded proposal
# is sent it at once (`hurry`).
COALESCE_S = 0.005
# After a peer answered UNIMPLEMENTED to SendStream, use unary Send this long before
# trying the stream again (it may have been upgraded meanwhile).
UNARY_FALLBACK_S = 60.0
# How often the transport asks whether the certificate files were replaced (off the
# send path: looking may stat the files). PeerTls itself looks at the files no more
# often than every [tls].reload_interval_seconds.
CERT_CHECK_S = 1.0
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_PEER_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_PEER_MESSAGE_BYTES),
]
# A restarted peer should hear from us within a second, not after gRPC's default
# reconnect backoff (up to two minutes).
_CHANNEL_OPTIONS = [
    *_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_SendStreamCall = grpc.aio.StreamUnaryCall[wire.SendRequest, wire.SendResponse]


def _entry_bytes(message: Message) -> int:
    return sum(len(entry.data) for entry in message.entries)


def _commit_only(queue: deque[Message]) -> bool:
    return all(m.type == MessageType.APPEND and not m.entries for m in queue)


def _drop_superseded(batch: list[Message]) -> list[Message]:
    """Drops each APPEND without entries that a later APPEND of the batch, of the same
    term, supersedes: the later one carries at least its commit index, and whatever it
    was probing. To Raft this is a lost message, which it tolerates by design."""
    kept: list[Message] = []
    later: Message | None = None
    for message in reversed(batch):
        if message.type == MessageType.APPEND:
            if (
                not message.entries
                and later is not None
                and later.term == message.term
                and later.commit >= message.commit
            ):
                continue
            later = message
        kept.append(message)
    kept.reverse()
    return kept


class _Peer:
    """The sending side of one peer: a channel, a queue and the task draining it."""

    def __init__(self, transport: GrpcTransport, member: Member) -> None:
        self.member = member
        self._transport = transport
        self.channel = transport._open_channel(member.peer_address)
        self.stub = wire_grpc.RaftServiceStub(self.channel)
        self._queue: deque[Message] = deque()
        self._queued = asyncio.Event()
        self._stream: _SendStreamCall | None = None
        self._unary_until = float("-inf")
        self._hurry = False
        # While only commit updates are queued: until when they wait for company.
        self.holding_until: float | None = None
        self.task = asyncio.create_task(self._drain(), name=f"raft-send-{member.id}")

    @property
    def holding(self) -> bool:
        return self.holding_until is not None

    def put(self, message: Message) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self._transport.dropped += 1  # Raft retransmits what matters
            return
        self._queue.append(message)
        self._queued.set()

    def hurry(self) -> None:
        """Sends what is queued without waiting for company."""
        self._hurry = True
        self._queued.set()

    async def _drain(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._queued.clear()
                await self._queued.wait()
                continue
            if queue[0].type == MessageType.SNAPSHOT:
                await self._send_snapshot(queue.popleft())
                continue
            if not self._hurry and _commit_only(queue):
                if self.holding_until is None:
                    self.holding_until = loop.time() + COALESCE_S
                if loop.time() < self.holding_until:
                    self._queued.clear()
                    timer = loop.call_at(self.holding_until, self._queued.set)
                    try:
                        await self._queued.wait()
                    finally:
                        timer.cancel()
                    continue
            self.holding_until = None
            self._hurry = False
            # Everything queued meanwhile goes in one write: while a write is in flight
            # the next batch builds up (the transport's own group commit).
            batch: list[Message] = []
            size = 0
            while queue and len(batch) < MAX_BATCH:
                head = queue[0]
                if head.type == MessageType.SNAPSHOT:
                    break
                size += _entry_bytes(head)
                if batch and size > MAX_BATCH_BYTES:
                    break
                batch.append(queue.popleft())
            try:
                await self._send_batch(_drop_superseded(batch) if len(batch) > 1 else batch)
            except Exception:  # unforeseen: log it, but never stop serving this peer
                log.exception("sending to node %d failed", self.member.id)
                self._end_stream()
                self._transport.handler.report_unreachable(self.member.id)

    async def _send_batch(self, batch: list[Message]) -> None:
        request = wire.SendRequest(
            cluster_id=self._transport.cluster_id,
            messages=[message_to_proto(m) for m in batch],
        )
        loop = asyncio.get_running_loop()
        if loop.time() < self._unary_until:
            await self._send_unary(request)
            return
        call = self._stream
        if call is None:
            call = self._stream = self.stub.SendStream()
        # A timer rather than asyncio.wait_for: no extra task per write.
        watchdog = loop.call_later(SEND_TIMEOUT_S, call.cancel)
        try:
            await call.write(request)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being closed
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # the watchdog ended a stalled write
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            code = await self._status(call)
        finally:
            watchdog.cancel()
        self._end_stream()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info("node %d does not take SendStream; using Send", self.member.id)
            self._unary_until = loop.time() + UNARY_FALLBACK_S
            await self._send_unary(request)
            return
        log.debug("stream to node %d failed: %s", self.member.id, code.name)
        self._transport.handler.report_unreachable(self.member.id)

    @staticmethod
    async def _status(call: _SendStreamCall) -> grpc.StatusCode:
        if not call.done():
            return grpc.StatusCode.UNKNOWN
        try:
            return await call.code()
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def _send_unary(self, request: wire.SendRequest) -> None:
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

        ok = False
        try:
            await self.stub.InstallSnapshot(parts(), timeout=60)
            ok = True
        except grpc.aio.AioRpcError as error:
            log.warning("snapshot to node %d failed: %s", self.member.id, error.code().name)
        except Exception:  # unforeseen: Raft must still hear how it went
            log.exception("snapshot to node %d failed", self.member.id)
        finally:
            # Raft keeps the follower in snapshot state until told, whatever happened.
            self._transport.handler.report_snapshot(self.member.id, ok)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self._end_stream()
        await self.channel.close()


class PeerSecurity(Protocol):
    """Mutual TLS between the nodes (implemented by kmsd.auth.tls.PeerTls)."""

    @property
    def generation(self) -> int:
        """Changes whenever the certificate files were replaced."""
        ...

    def channel(
        self, address: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel: ...

    def add_port(self, server: grpc.aio.Server, listen: str) -> int: ...

    def node_id_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> int | None:
        """The member id the caller's certificate names, or None."""
        ...


# `_sender_of` for a plaintext peer port: any member id is believed.
_UNAUTHENTICATED = 0


class GrpcTransport(wire_grpc.RaftServiceServicer):
    """A node's Raft traffic over gRPC; see the module docstring."""

    def __init__(
        self, node_id: int, listen: str, cluster_id: str, security: PeerSecurity | None = None
    ) -> None:
        self.node_id = node_id
        self.security = security
        self._generation = security.generation if security is not None else 0
        self.listen = listen
        self.cluster_id = cluster_id
        self.port = 0
        self.dropped = 0
        self._handler: PeerHandler | None = None
        self._members: dict[int, Member] = {}
        self._peers: dict[int, _Peer] = {}
        self._server: grpc.aio.Server | None = None
        self._cert_watch: asyncio.Task[None] | None = None

    @property
    def handler(self) -> PeerHandler:
        assert self._handler is not None
        return self._handler

    # -- the two network seams (transport security plugs in here) ----------------------

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        """The channel to a peer's Raft port."""
        if self.security is not None:
            return self.security.channel(address, _CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)

    def _bind(self, server: grpc.aio.Server, listen: str) -> int:
        """Adds the listening port; returns its number (0 if it could not be bound)."""
        if self.security is not None:
            return self.security.add_port(server, listen)
        return server.add_insecure_port(listen)

    def _refresh_channels(self) -> None:
        """Rebuilds the channels to peers after the certificate files were replaced, so
        new connections present the new certificate."""
        if self.security is None or self._server is None:
            return
        generation = self.security.generation
        if generation == self._generation:
            return
        self._generation = generation
        log.info("peer certificates replaced: reconnecting to peers with the new ones")
        for node_id in list(self._peers):
            asyncio.create_task(self._peers.pop(node_id).close())
        self.set_members(self._members)

    async def _watch_certificates(self) -> None:
        while True:
            await asyncio.sleep(CERT_CHECK_S)
            try:
                self._refresh_channels()
            except Exception:  # unforeseen: keep the current channels, look again later
                log.exception("checking the peer certificates failed")

    async def _sender_of(self, context: grpc.aio.ServicerContext[Any, Any]) -> int:
        """The member id the caller's certificate proves (`_UNAUTHENTICATED` on a
        plaintext port); aborts the call with PERMISSION_DENIED for a certificate that
        is no member's."""
        if self.security is None:
            return _UNAUTHENTICATED
        node_id = self.security.node_id_of(context)
        if node_id is None or node_id == self.node_id or node_id not in self._members:
            self.dropped += 1
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the peer certificate does not name a member of this cluster",
            )
        assert node_id is not None
        return node_id

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

    def hurry(self, node_id: int) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.hurry()

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
            why = f"forwarding to the leader (node {leader_id}) failed: {error.details()}"
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                # Connection refused or reset, or the node said it is not the leader.
                raise LeaderUnreachable(why) from None
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Overloaded(why, retry_after_seconds=0.5) from None
            raise UnavailableError(why) from None
        return response.index

    async def start(self) -> None:
        server = grpc.aio.server(options=_OPTIONS)
        service = wire.DESCRIPTOR.services_by_name["RaftService"]
        server.add_generic_rpc_handlers((parsing_handler(service, wire, self, self._bad_request),))
        self.port = self._bind(server, self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        self._server = server
        self.set_members(self._members)
        if self.security is not None:
            self._cert_watch = asyncio.create_task(
                self._watch_certificates(), name="raft-peer-certificates"
            )

    async def stop(self) -> None:
        if self._cert_watch is not None:
            self._cert_watch.cancel()
            await asyncio.gather(self._cert_watch, return_exceptions=True)
            self._cert_watch = None
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

    def _accept(self, proto: wire.Message, sender: int, data: bytes = b"") -> Message | None:
        """The peer message `proto` as a core Message, or None (dropped and counted) if
        it does not decode or its sender may not send it. Every peer message passes here,
        with the member id its call's certificate proves (`sender`, from `_sender_of`)."""
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
        if sender != _UNAUTHENTICATED and message.src != sender:
            self.dropped += 1  # a member speaking for another one
            return None
        return message

    def _deliver(self, request: wire.SendRequest, sender: int) -> None:
        handler = self.handler
        for proto in request.messages:
            if proto.type == wire.MESSAGE_TYPE_SNAPSHOT:
                self.dropped += 1  # snapshots only travel through InstallSnapshot
                continue
            message = self._accept(proto, sender)
            if message is not None:
                handler.receive(message)

    async def Send(
        self, request: wire.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wire.SendResponse:
        sender = await self._sender_of(context)
        if request.cluster_id != self.cluster_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong cluster id")
        self._deliver(request, sender)
        return wire.SendResponse()

    async def SendStream(
        self,
        request_iterator: AsyncIterator[wire.SendRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> wire.SendResponse:
        # A request that does not parse ends the call (parsing_handler counts it), as
        # does one naming another cluster; the sender opens a new stream.
        sender = await self._sender_of(context)
        async for request in request_iterator:
            if request.cluster_id != self.cluster_id:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong cluster id")
            self._deliver(request, sender)
        return wire.SendResponse()

    async def InstallSnapshot(
        self,
        request_iterator: AsyncIterator[wire.InstallSnapshotRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> wire.InstallSnapshotResponse:
        sender = await self._sender_of(context)
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
        message = self._accept(header.message, sender, data)
        if message is None or message.type != MessageType.SNAPSHOT or message.snapshot is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a snapshot message")
        assert message is not None
        self.handler.receive(message)
        return wire.InstallSnapshotResponse()

    async def Propose(
        self, request: wire.ProposeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wire.ProposeResponse:
        # Only members may forward commands (a command carries its caller's principal).
        await self._sender_of(context)
        if request.cluster_id != self.cluster_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong cluster id")
        try:
            index = await self.handler.accept_forwarded(request.command)
        except Overloaded as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message)
        except UnavailableError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
        return wire.ProposeResponse(index=index)
