"""A fault-injecting TCP proxy for the Raft links of a chaos cluster, controlled in-process.

One listener sits in front of every node's Raft port (`[[cluster.members]].peer_address`
points at it), so every Raft message and every forwarded proposal between nodes crosses
a `ProxyNet`. The proxy learns which node opened a connection by looking the client
socket up in /proc (its inode, then which node process holds it), so faults apply to
*directed links* `src -> dst`: the connections `src` opens to `dst`, which carry
`src`'s Raft messages to `dst` (the Raft transport answers every message with a message
of its own, on a connection the other way round).

Link modes:

* `PASS`: bytes flow.
* `HOLD` (black hole): nothing is read or written on the link's connections, in either
  direction, and new connections are accepted but stall too. TCP stays up, as it does
  through a real partition: RPCs time out, and when the link heals the held bytes flow
  again (late, like retransmitted packets).
* `RESET`: live connections are reset (RST) and new ones are accepted and reset at
  once, so gRPC sees connection failures and reconnects with backoff.
* delay: `set_delay(src, dst, seconds, jitter)` adds user-space latency to every chunk
  `src` sends on the link's connections (its Raft messages to `dst`), preserving
  order; the bytes coming back (gRPC responses) are not delayed.

Everything runs on one asyncio loop in a daemon thread; the public methods are
thread-safe and return once the change is in effect. The loop stops by itself after
`lifetime_s` even if nobody calls `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("chaos.proxy")

T = TypeVar("T")
CHUNK = 64 * 1024


class Mode(enum.Enum):
    PASS = "pass"
    HOLD = "hold"
    RESET = "reset"


@dataclass
class _Link:
    """The fault state of one directed link and the connections that carry it."""

    mode: Mode = Mode.PASS
    delay_s: float = 0.0
    jitter_s: float = 0.0
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    conns: set[_Conn] = field(default_factory=set)


def _tcp_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the loopback socket 127.0.0.1:local_port -> 127.0.0.1:remote_port.

    gRPC dials IPv4 addresses from dual-stack sockets too, so /proc/net/tcp6 (with
    v4-mapped addresses) is searched as well as /proc/net/tcp."""
    wanted = {
        (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"),
        (
            f"0000000000000000FFFF00000100007F:{local_port:04X}",
            f"0000000000000000FFFF00000100007F:{remote_port:04X}",
        ),
    }
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_path) as table:
                next(table)
                for line in table:
                    parts = line.split()
                    if (parts[1], parts[2]) in wanted:
                        return int(parts[9])
        except FileNotFoundError:
            continue
    return None


def _pid_holding(inode: int, pids: Iterable[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


class _Conn:
    """One proxied connection: two pumps, each a reader task and a writer task."""

    def __init__(
        self,
        net: ProxyNet,
        link: _Link,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.net = net
        self.link = link
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for reader, writer, forward in (
            (self.client[0], self.server[1], True),
            (self.server[0], self.client[1], False),
        ):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(256)
            self.tasks.append(asyncio.create_task(self._read(reader, queue, forward)))
            self.tasks.append(asyncio.create_task(self._write(writer, queue)))

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[Any], forward: bool
    ) -> None:
        link = self.link
        rng = self.net.rng
        try:
            while True:
                await link.flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                delay = 0.0
                if forward and link.delay_s:
                    delay = link.delay_s + (rng.uniform(0, link.jitter_s) if link.jitter_s else 0)
                await queue.put((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((0.0, b""))

    async def _write(self, writer: asyncio.StreamWriter, queue: asyncio.Queue[Any]) -> None:
        link = self.link
        last = 0.0
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                due = max(due, last)  # jitter never reorders bytes
                last = due
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await link.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self, reset: bool = False, abort: bool = False) -> None:
        """Closes both sockets: with `reset`, with an RST rather than a FIN; with `abort`,
        at once, dropping unsent bytes."""
        self.link.conns.discard(self)
        for _, writer in (self.client, self.server):
            if reset or abort:
                _abort(writer, reset)
            else:
                writer.transport.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


def _abort(writer: asyncio.StreamWriter, reset: bool = False) -> None:
    """Closes a connection at once; with `reset`, with an RST (SO_LINGER 0)."""
    transport = writer.transport
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ProxyNet:
    """The proxies in front of every node's Raft port, and the state of every link.

    `identify()` returns {pid: node id} of the node processes running now (the cluster
    passes its live processes, so restarts are followed); a connection from any other
    process has no source node (`unidentified` counts them; `isolate` cuts them too).
    """

    def __init__(
        self,
        identify: Callable[[], dict[int, int]],
        *,
        seed: int = 0,
        lifetime_s: float = 3600.0,
    ) -> None:
        self._identify = identify
        self.rng = random.Random(seed)
        self._links: dict[tuple[int | None, int], _Link] = {}
        self._servers: dict[int, asyncio.AbstractServer] = {}
        self._targets: dict[int, int] = {}
        self.unidentified = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, args=(lifetime_s,), name="chaos-proxy", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)

    # -- thread plumbing ---------------------------------------------------------------

    def _run(self, lifetime_s: float) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        # A proxy nobody closes must not outlive the test run.
        self._loop.call_later(lifetime_s, lambda: asyncio.ensure_future(self._shutdown()))
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the proxy is closed (or outlived its lifetime)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        """Stops every listener and connection and the loop thread."""
        if self._closed:
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
        self._closed = True
        self._thread.join(10)

    async def _shutdown(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for link in self._links.values():
            for conn in list(link.conns):
                conn.close(abort=True)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(3):  # let the transports' connection_lost callbacks run
            await asyncio.sleep(0)
        self._loop.call_soon(self._loop.stop)

    # -- listeners ---------------------------------------------------------------------

    def add_node(self, node_id: int, target_port: int, listen_port: int = 0) -> int:
        """Starts the proxy in front of node `node_id`'s Raft port; returns its port."""
        return self._call(self._add_node(node_id, target_port, listen_port))

    async def _add_node(self, node_id: int, target_port: int, listen_port: int) -> int:
        self._targets[node_id] = target_port
        server = await asyncio.start_server(
            lambda r, w: self._accept(node_id, r, w), "127.0.0.1", listen_port
        )
        self._servers[node_id] = server
        return int(server.sockets[0].getsockname()[1])

    def _link(self, src: int | None, dst: int) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            link = _Link()
            link.flowing.set()
            self._links[(src, dst)] = link
        return link

    def _source(self, writer: asyncio.StreamWriter, dst: int) -> int | None:
        peer_port = writer.get_extra_info("peername")[1]
        own_port = writer.get_extra_info("sockname")[1]
        try:
            inode = _tcp_inode(peer_port, own_port)
        except OSError:
            inode = None
        if inode is None:
            return None
        pids = self._identify()
        pid = _pid_holding(inode, pids)
        return None if pid is None else pids[pid]

    async def _accept(
        self, dst: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            src = self._source(writer, dst)
            for _ in range(3):  # a socket just created may not be visible yet
                if src is not None:
                    break
                await asyncio.sleep(0.01)
                src = self._source(writer, dst)
            if src is None:
                self.unidentified += 1
                log.warning("proxy to node %d: could not tell which node connected", dst)
            link = self._link(src, dst)
            if link.mode == Mode.RESET:
                _abort(writer, reset=True)
                return
            try:
                upstream = await asyncio.open_connection("127.0.0.1", self._targets[dst])
            except OSError:
                # The node is down: refuse the way a dead port would.
                _abort(writer)
                return
            conn = _Conn(self, link, (reader, writer), upstream)
            link.conns.add(conn)
            conn.start()
        except asyncio.CancelledError:
            # The proxy is shutting down in the middle of an accept: close what was
            # opened and end quietly (asyncio's stream callback reports a cancelled
            # handler as an error).
            _abort(writer)
            if upstream is not None:
                _abort(upstream[1])

    # -- faults ------------------------------------------------------------------------

    def _set(self, pairs: Iterable[tuple[int | None, int]], mode: Mode) -> None:
        self._call(self._apply(list(pairs), mode))

    async def _apply(self, pairs: list[tuple[int | None, int]], mode: Mode) -> None:
        for src, dst in pairs:
            link = self._link(src, dst)
            link.mode = mode
            if mode == Mode.PASS:
                link.flowing.set()
            else:
                link.flowing.clear()
            if mode == Mode.RESET:
                for conn in list(link.conns):
                    conn.close(reset=True)

    @property
    def nodes(self) -> list[int]:
        return sorted(self._targets)

    def block(self, src: int, dst: int, mode: Mode = Mode.HOLD) -> None:
        """Cuts the directed link src -> dst (one way)."""
        self._set([(src, dst)], mode)

    def unblock(self, src: int, dst: int) -> None:
        self._set([(src, dst)], Mode.PASS)

    def isolate(self, node: int, mode: Mode = Mode.HOLD) -> None:
        """Cuts every link to and from `node`."""
        others: list[int | None] = [n for n in self.nodes if n != node]
        others.append(None)  # and connections from processes it could not identify
        self._set([(node, o) for o in others if o is not None] + [(o, node) for o in others], mode)

    def partition(self, groups: Iterable[Iterable[int]], mode: Mode = Mode.HOLD) -> None:
        """Cuts every link between different groups; a node in no group is alone."""
        group_of: dict[int, int] = {}
        for number, group in enumerate(groups):
            for node in group:
                group_of[node] = number
        for node in self.nodes:
            group_of.setdefault(node, -node)
        self.heal()
        self._set(
            [(a, b) for a in self.nodes for b in self.nodes if group_of[a] != group_of[b]], mode
        )

    def set_delay(self, src: int, dst: int, seconds: float, jitter: float = 0.0) -> None:
        """Adds latency (plus up to `jitter`) to the link src -> dst's connections."""

        async def change() -> None:
            link = self._link(src, dst)
            link.delay_s, link.jitter_s = seconds, jitter

        self._call(change())

    def heal(self) -> None:
        """Every link passes again, without delay."""

        async def change() -> None:
            for link in self._links.values():
                link.mode = Mode.PASS
                link.delay_s = link.jitter_s = 0.0
                link.flowing.set()

        self._call(change())

    def describe(self) -> str:
        """The faulty links, for logs."""

        async def faults() -> str:
            found = [
                f"{src}->{dst}:{link.mode.value}"
                + (f"+{link.delay_s * 1000:.0f}ms" if link.delay_s else "")
                for (src, dst), link in sorted(self._links.items(), key=lambda kv: str(kv[0]))
                if link.mode != Mode.PASS or link.delay_s
            ]
            return ", ".join(found) or "no faults"

        return self._call(faults())
