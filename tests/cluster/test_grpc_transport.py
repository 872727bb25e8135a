"""GrpcTransport on loopback, in one process: messages over the long-lived SendStream,
reconnection, the unary fallback for peers without it, the checks on untrusted peer
input, commit-only coalescing, and how forwarding failures are classified."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from kms.raft.v1 import raft_service_pb2 as wire

from kmsd.errors import UnavailableError
from kmsd.log.raft_disk import Member
from kmsd.raft import Entry, EntryType, Message, MessageType
from kmsd.transport import grpc_transport
from kmsd.transport.base import LeaderUnreachable, Overloaded
from kmsd.transport.codec import message_to_proto
from kmsd.transport.grpc_transport import GrpcTransport

CLUSTER = "test-cluster"


class Handler:
    """A PeerHandler that records what the transport hands it."""

    def __init__(self) -> None:
        self.received: list[Message] = []
        self.unreachable: list[int] = []
        self.snapshots: list[tuple[int, bool]] = []
        self.forwarded: list[bytes] = []
        self.refuse: UnavailableError | None = None

    def receive(self, message: Message) -> None:
        self.received.append(message)

    async def accept_forwarded(self, envelope: bytes) -> int:
        if self.refuse is not None:
            raise self.refuse
        self.forwarded.append(envelope)
        return len(self.forwarded)

    def report_unreachable(self, node_id: int) -> None:
        self.unreachable.append(node_id)

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        self.snapshots.append((node_id, ok))


async def until(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)  # polling pace, not a wait for state


async def start(node_id: int, handler: Handler, listen: str = "127.0.0.1:0") -> GrpcTransport:
    transport = GrpcTransport(node_id, listen, CLUSTER)
    transport.bind(handler)
    await transport.start()
    return transport


def connect(*transports: GrpcTransport) -> None:
    members = {t.node_id: Member(t.node_id, f"127.0.0.1:{t.port}", "") for t in transports}
    for transport in transports:
        transport.set_members(members)


def heartbeat(src: int, dst: int, term: int = 1, context: bytes = b"") -> Message:
    return Message(MessageType.HEARTBEAT, src, dst, term, context=context)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_messages_flow_both_ways_over_one_stream_per_peer() -> None:
    async def scenario() -> None:
        h1, h2 = Handler(), Handler()
        t1, t2 = await start(1, h1), await start(2, h2)
        try:
            connect(t1, t2)
            for i in range(50):
                t1.send([heartbeat(1, 2, context=b"%d" % i)])
            t2.send([Message(MessageType.HEARTBEAT_RESP, 2, 1, 1)])
            await until(lambda: len(h2.received) == 50 and len(h1.received) == 1, "delivery")
            assert [m.context for m in h2.received] == [b"%d" % i for i in range(50)]
            stream = t1._peers[2]._stream
            assert stream is not None and not stream.done()
            t1.send([heartbeat(1, 2)])
            await until(lambda: len(h2.received) == 51, "more")
            assert t1._peers[2]._stream is stream  # the same call carries everything
            assert h1.unreachable == [] and t2.dropped == 0
        finally:
            await t1.stop()
            await t2.stop()

    run(scenario)


def test_a_restarted_peer_is_reached_again_on_a_new_stream() -> None:
    async def scenario() -> None:
        h1, h2 = Handler(), Handler()
        t1, t2 = await start(1, h1), await start(2, h2)
        port = t2.port
        try:
            connect(t1, t2)
            t1.send([heartbeat(1, 2)])
            await until(lambda: len(h2.received) == 1, "first delivery")
            await t2.stop()
            h2 = Handler()
            t2 = await start(2, h2, f"127.0.0.1:{port}")
            connect(t1, t2)
            # Raft resends on every heartbeat; so does this loop, until one arrives.
            deadline = time.monotonic() + 10
            while not h2.received:
                assert time.monotonic() < deadline, "the restarted peer was never reached"
                t1.send([heartbeat(1, 2)])
                await asyncio.sleep(0.02)  # the heartbeat interval of this test
            assert 2 in h1.unreachable  # the broken stream was reported to Raft
        finally:
            await t1.stop()
            await t2.stop()

    run(scenario)


def test_a_peer_without_send_stream_gets_unary_sends() -> None:
    """An older peer (before SendStream) answers UNIMPLEMENTED; messages then go by Send."""

    async def scenario() -> None:
        got: list[wire.SendRequest] = []

        async def send(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            got.append(wire.SendRequest.FromString(raw))
            return wire.SendResponse().SerializeToString()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "kms.raft.v1.RaftService", {"Send": grpc.unary_unary_rpc_method_handler(send)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        h1 = Handler()
        t1 = await start(1, h1)
        try:
            t1.set_members(
                {1: Member(1, f"127.0.0.1:{t1.port}", ""), 2: Member(2, f"127.0.0.1:{port}", "")}
            )
            deadline = time.monotonic() + 10
            while not got:
                assert time.monotonic() < deadline, "no Send arrived"
                t1.send([heartbeat(1, 2)])
                await asyncio.sleep(0.02)  # the heartbeat interval of this test
            assert got[0].cluster_id == CLUSTER and got[0].messages[0].type == 7
            assert t1._peers[2]._stream is None
        finally:
            await t1.stop()
            await server.stop(None)

    run(scenario)


def _stream_call(channel: grpc.aio.Channel) -> Any:
    return channel.stream_unary(
        "/kms.raft.v1.RaftService/SendStream",
        request_serializer=lambda raw: raw,
        response_deserializer=wire.SendResponse.FromString,
    )


def _request(*messages: Message, cluster: str = CLUSTER) -> bytes:
    return wire.SendRequest(
        cluster_id=cluster, messages=[message_to_proto(m) for m in messages]
    ).SerializeToString()


def test_untrusted_stream_input_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        h2 = Handler()
        t2 = await start(2, h2)
        t2.set_members({1: Member(1, "127.0.0.1:1", ""), 2: Member(2, f"127.0.0.1:{t2.port}", "")})
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{t2.port}")
        try:
            call = _stream_call(channel)()
            # A sender that is not a member, a message to another node, a message
            # claiming to come from the receiver itself, an unknown type, a snapshot
            # (those only travel by InstallSnapshot): each dropped, the stream goes on.
            await call.write(_request(heartbeat(7, 2)))
            await call.write(_request(heartbeat(1, 3)))
            await call.write(_request(heartbeat(2, 2)))
            bogus = message_to_proto(heartbeat(1, 2))
            bogus.type = 99  # type: ignore[assignment]
            await call.write(
                wire.SendRequest(cluster_id=CLUSTER, messages=[bogus]).SerializeToString()
            )
            snapshot = message_to_proto(heartbeat(1, 2))
            snapshot.type = wire.MESSAGE_TYPE_SNAPSHOT
            await call.write(
                wire.SendRequest(cluster_id=CLUSTER, messages=[snapshot]).SerializeToString()
            )
            await call.write(_request(heartbeat(1, 2, context=b"ok")))
            await until(lambda: len(h2.received) == 1, "the one good message")
            assert h2.received[0].context == b"ok" and t2.dropped == 5
            # Bytes that do not parse end the stream (and are counted).
            await call.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await call
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert t2.dropped == 6
            # So does a batch naming another cluster.
            call = _stream_call(channel)()
            await call.write(_request(heartbeat(1, 2), cluster="other"))
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await call
            assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(h2.received) == 1
        finally:
            await channel.close()
            await t2.stop()

    run(scenario)


def _append(term: int, commit: int, *indexes: int) -> Message:
    entries = tuple(Entry(i, term, EntryType.NORMAL, b"x") for i in indexes)
    return Message(MessageType.APPEND, 1, 2, term, index=1, log_term=term, entries=entries,
                   commit=commit)  # fmt: skip


def test_a_commit_only_append_superseded_in_its_batch_is_dropped() -> None:
    commit_only = _append(2, 5)
    with_entries = _append(2, 6, 6, 7)
    beat = heartbeat(1, 2, term=2)
    drop = grpc_transport._drop_superseded
    assert drop([commit_only, beat, with_entries]) == [beat, with_entries]
    assert drop([commit_only, _append(2, 6)]) == [_append(2, 6)]
    # Kept: nothing later supersedes it (older term, lower commit, or it is last).
    assert drop([commit_only, _append(3, 6, 6)]) == [commit_only, _append(3, 6, 6)]
    assert drop([commit_only, _append(2, 4, 6)]) == [commit_only, _append(2, 4, 6)]
    assert drop([with_entries, commit_only]) == [with_entries, commit_only]


def test_commit_only_appends_wait_for_company_unless_hurried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        h1, h2 = Handler(), Handler()
        t1, t2 = await start(1, h1), await start(2, h2)
        try:
            connect(t1, t2)
            t1.send([heartbeat(1, 2)])  # opens the stream
            await until(lambda: len(h2.received) == 1, "the stream")
            # A commit-only update and, within the window, entries: one batch, the
            # superseded update dropped.
            monkeypatch.setattr(grpc_transport, "COALESCE_S", 60.0)
            peer = t1._peers[2]
            t1.send([_append(2, 5)])
            await until(lambda: peer.holding, "the update to be held")
            assert len(h2.received) == 1
            t1.send([_append(2, 6, 2, 3)])
            await until(lambda: len(h2.received) == 2, "the batch")
            assert h2.received[1].commit == 6 and len(h2.received[1].entries) == 2
            assert not peer.holding
            # Hurried (a follower waits for the commit of its own proposal): at once.
            t1.send([_append(2, 7)])
            await until(lambda: peer.holding, "the update to be held")
            assert len(h2.received) == 2
            t1.hurry(2)
            await until(lambda: len(h2.received) == 3, "the hurried update")
        finally:
            await t1.stop()
            await t2.stop()

    run(scenario)


def test_forwarding_failures_say_whether_another_leader_may_be_tried() -> None:
    async def scenario() -> None:
        h1, h2 = Handler(), Handler()
        t1, t2 = await start(1, h1), await start(2, h2)
        try:
            connect(t1, t2)
            assert await t1.forward(2, b"cmd", 5.0) == 1 and h2.forwarded == [b"cmd"]
            h2.refuse = LeaderUnreachable("node 2 is not the leader")
            with pytest.raises(LeaderUnreachable):
                await t1.forward(2, b"cmd", 5.0)
            h2.refuse = Overloaded("too many proposals queued", retry_after_seconds=0.5)
            with pytest.raises(Overloaded) as overloaded:
                await t1.forward(2, b"cmd", 5.0)
            assert overloaded.value.retry_after_seconds == 0.5
            await t2.stop()
            with pytest.raises(LeaderUnreachable):  # nothing listens: surely not delivered
                await t1.forward(2, b"cmd", 5.0)
        finally:
            await t1.stop()
            await t2.stop()

    run(scenario)
