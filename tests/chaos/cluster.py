"""A cluster of real `kmsd serve` processes on loopback, with a fault proxy on every Raft link.

`ChaosCluster(root, size)` writes one TOML config per node (fast Raft timings, one shared
file seal, every member's `peer_address` pointing at the `ProxyNet` listener in front of
that member's Raft port), starts the nodes and offers the faults the chaos tests inject:
SIGKILL, SIGSTOP/SIGCONT, restart on the same data directory, whole-cluster kill and
restart, partitions through the proxy, and a torn tail on a stopped node's WAL.

Nothing here sleeps to wait for state: `wait_leader`, `wait_converged` and node start-up
poll with deadlines. Node stderr goes to `<root>/node-<id>.log`, appended across restarts.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from kms.v1 import cluster_service_pb2 as cluster_pb
from kms.v1 import cluster_service_pb2_grpc as cluster_grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from proxy import Mode, ProxyNet

from kmsd.auth.certs import ensure_dev_pki
from kmsd.crypto.seal import FileSeal
from kmsd.dev_cluster import free_ports, security_toml
from kmsd_process import tls_files

START_TIMEOUT_S = 60.0
POLL_S = 0.05  # a pacing interval for polling loops, never a wait for state
# Test-side channels: reconnect quickly to a node that was just restarted.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
_LEADER = cluster_pb.NODE_ROLE_LEADER
# Runs a node so that it dies with the test process, even if that is killed -9: the
# kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG survives the exec).
_LAUNCHER = (
    "import ctypes, os, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, 9); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
    "os.execv(sys.executable, [sys.executable, '-m', 'kmsd', 'serve', '--config', sys.argv[2]])"
)


class ClusterError(AssertionError):
    """The cluster did not reach a state in time (a test failure, with details)."""


@dataclass
class NodeProc:
    """One node: its ports, files and (when running) its process."""

    node_id: int
    client_port: int
    peer_port: int
    proxy_port: int
    data_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def up(self) -> bool:
        """Running and not paused: expected to answer."""
        return self.running and not self.paused

    @property
    def wal_dir(self) -> Path:
        return self.data_dir / "raft" / "wal"


class ChaosCluster:
    """N kmsd nodes behind fault proxies; see the module docstring."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        seed: int = 0,
        tick_ms: int = 50,
        election_ticks: int = 10,
        request_timeout_s: float = 2.0,
        max_staleness_ms: int = 500,
        snapshot_every: int = 10_000,
        log_level: str = "INFO",
        lifetime_s: float = 3600.0,
    ) -> None:
        self.root = root.resolve()
        self.size = size
        self.request_timeout_s = request_timeout_s
        self.max_staleness_ms = max_staleness_ms
        self.election_timeout_s = 2 * election_ticks * tick_ms / 1000
        self.events: list[tuple[int, str]] = []  # (time.monotonic_ns(), what happened)
        self.history_origin_ns: int | None = None
        self._t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        self.seal_path = self.root / "root.key"
        FileSeal.create(self.seal_path)  # what `kmsd init --seal` does: one key for all
        # Mutual TLS as `kmsd dev` sets it up: a CA, node certificates and an admin.
        self.pki = ensure_dev_pki(self.root / "tls", "chaos", range(1, size + 1))
        self.tls = tls_files(self.pki)
        self._credentials = self.tls.credentials()
        self.proxy = ProxyNet(self._pids, seed=seed, lifetime_s=lifetime_s)
        ports = free_ports(2 * size)
        self.nodes: dict[int, NodeProc] = {}
        for i in range(1, size + 1):
            client, peer = ports[i - 1], ports[size + i - 1]
            self.nodes[i] = NodeProc(
                node_id=i,
                client_port=client,
                peer_port=peer,
                proxy_port=self.proxy.add_node(i, peer),
                data_dir=self.root / f"node-{i}",
                config_path=self.root / f"node-{i}.toml",
                log_path=self.root / f"node-{i}.log",
            )
        raft = (
            f"\n[raft]\ntick_ms = {tick_ms}\nelection_ticks = {election_ticks}\n"
            f"request_timeout_seconds = {request_timeout_s}\n"
            f"max_staleness_ms = {max_staleness_ms}\n"
        )
        members = "".join(
            f"\n[[cluster.members]]\nid = {n.node_id}\n"
            f'peer_address = "127.0.0.1:{n.proxy_port}"\n'
            f'client_address = "{n.endpoint}"\n'
            for n in self.nodes.values()
        )
        for node in self.nodes.values():
            node.config_path.write_text(
                f"[node]\nid = {node.node_id}\n"
                f'data_dir = "{node.data_dir}"\n'
                f'listen = "{node.endpoint}"\n'
                f'peer_listen = "127.0.0.1:{node.peer_port}"\n'
                f'log_level = "{log_level}"\n'
                f'\n[seal]\ntype = "file"\npath = "{self.seal_path}"\n'
                f"{raft}"
                f"\n[log]\nsnapshot_every = {snapshot_every}\n"
                f'\n[cluster]\nid = "chaos"\n{members}'
                f"{security_toml(self.pki, node.node_id)}"
            )

    # -- bookkeeping -------------------------------------------------------------------

    def note(self, event: str) -> None:
        """Records (and prints) a fault or phase, with the time since the cluster began."""
        now = time.monotonic_ns()
        self.events.append((now, event))
        print(f"[chaos {now / 1e9 - self._t0:7.2f}s] {event}", flush=True)

    def timeline(self) -> list[str]:
        """The events, timed from the cluster's creation and, once `history_origin_ns` is
        set (the first recorded call), also on the clock of the checker's explanations."""
        lines = []
        for ns, event in self.events:
            line = f"[chaos {ns / 1e9 - self._t0:7.2f}s"
            if self.history_origin_ns is not None:
                line += f" | history {(ns - self.history_origin_ns) / 1e9:8.3f}s"
            lines.append(f"{line}] {event}")
        return lines

    def _pids(self) -> dict[int, int]:
        return {n.proc.pid: n.node_id for n in self.nodes.values() if n.proc is not None}

    @property
    def endpoints(self) -> list[str]:
        return [n.endpoint for n in self.nodes.values()]

    @property
    def quorum(self) -> int:
        return self.size // 2 + 1

    def up_nodes(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.up]

    # -- processes ---------------------------------------------------------------------

    def start(self) -> None:
        """Starts every node and waits for a leader."""
        self.start_nodes(self.nodes)
        self.wait_leader()

    def start_nodes(self, ids: Iterable[int], wait: bool = True) -> None:
        """Starts the given (stopped) nodes together and waits until each one serves.
        Call from the main thread: a node dies when the thread that started it ends."""
        offsets: dict[int, int] = {}
        for node_id in ids:
            node = self.nodes[node_id]
            assert not node.running, f"node {node_id} is running"
            node.starts += 1
            with node.log_path.open("ab") as log_file:
                log_file.write(f"==== chaos: start #{node.starts} ====\n".encode())
                offsets[node_id] = log_file.tell()
                node.proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, str(os.getpid()), str(node.config_path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            node.paused = False
            self._reset_channel(node)
        self.note(f"started nodes {sorted(offsets)}")
        if wait:
            for node_id, offset in offsets.items():
                self._wait_serving(self.nodes[node_id], offset)

    def _wait_serving(self, node: NodeProc, offset: int) -> None:
        marker = re.compile(rf"kmsd node {node.node_id} serving on ".encode())
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with node.log_path.open("rb") as log_file:
                log_file.seek(offset)
                if marker.search(log_file.read()):
                    return
            if node.proc is None or node.proc.poll() is not None:
                code = None if node.proc is None else node.proc.returncode
                raise ClusterError(
                    f"node {node.node_id} exited with {code} while starting:\n"
                    + self.log_tail(node.node_id, 40)
                )
            time.sleep(POLL_S)
        raise ClusterError(f"node {node.node_id} did not serve within {START_TIMEOUT_S}s")

    def kill(self, node_id: int) -> None:
        """SIGKILL (a crash: no shutdown code runs)."""
        node = self.nodes[node_id]
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(timeout=10)
            node.proc = None
        node.paused = False
        self._reset_channel(node)
        self.note(f"killed node {node_id}")

    def kill_all(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None:
                node.proc.send_signal(signal.SIGKILL)
        for node_id in self.nodes:
            self.kill(node_id)

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM to every node, and wait for each to exit (a clean shutdown: their
        audit logs are synced and closed)."""
        for node in self.nodes.values():
            if node.proc is not None:
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                    node.paused = False
                node.proc.send_signal(signal.SIGTERM)
        for node_id, node in self.nodes.items():
            if node.proc is not None:
                node.proc.wait(timeout=timeout)
                node.proc = None
                self._reset_channel(node)
                self.note(f"stopped node {node_id}")

    def restart(self, node_id: int) -> None:
        """SIGKILL if running, then start again on the same data directory."""
        if self.nodes[node_id].proc is not None:
            self.kill(node_id)
        self.start_nodes([node_id])

    def pause(self, node_id: int) -> None:
        """SIGSTOP: the process stops, its sockets stay open."""
        node = self.nodes[node_id]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True
        self.note(f"paused (SIGSTOP) node {node_id}")

    def resume(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if node.proc is not None and node.paused:
            node.proc.send_signal(signal.SIGCONT)
        node.paused = False
        self.note(f"resumed (SIGCONT) node {node_id}")

    def close(self) -> None:
        """Kills every node and stops the proxy (safe to call twice)."""
        for node in self.nodes.values():
            if node.proc is not None:
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.send_signal(signal.SIGKILL)
                node.proc.wait(timeout=10)
                node.proc = None
            if node.channel is not None:
                node.channel.close()
                node.channel = None
        self.proxy.close()

    # -- network faults ----------------------------------------------------------------

    def isolate(self, node_id: int, mode: Mode = Mode.HOLD) -> None:
        self.proxy.isolate(node_id, mode)
        self.note(f"isolated node {node_id} ({mode.value})")

    def partition(self, groups: list[list[int]], mode: Mode = Mode.HOLD) -> None:
        self.proxy.partition(groups, mode)
        self.note(f"partitioned {groups} ({mode.value})")

    def block(self, src: int, dst: int, mode: Mode = Mode.HOLD) -> None:
        self.proxy.block(src, dst, mode)
        self.note(f"blocked link {src}->{dst} ({mode.value})")

    def set_delay(self, src: int, dst: int, seconds: float, jitter: float = 0.0) -> None:
        self.proxy.set_delay(src, dst, seconds, jitter)
        self.note(f"delay on link {src}->{dst}: {seconds * 1000:.0f}ms +{jitter * 1000:.0f}ms")

    def heal_network(self) -> None:
        self.proxy.heal()
        self.note("healed the network")

    def heal(self) -> None:
        """Heals the network, resumes paused nodes and starts stopped ones."""
        self.heal_network()
        for node_id, node in self.nodes.items():
            if node.paused:
                self.resume(node_id)
        stopped = [i for i, n in self.nodes.items() if not n.running]
        if stopped:
            self.start_nodes(stopped)

    # -- disk faults -------------------------------------------------------------------

    def tear_wal_tail(self, node_id: int, kind: str, seed: int) -> str:
        """Damages the end of the last WAL segment of a stopped node the way a crash
        mid-write does: `garbage` (random bytes), `partial` (a record cut short) or
        `zeros` (preallocated, never written space). Returns what was done."""
        node = self.nodes[node_id]
        assert not node.running, "tear the WAL of a stopped node only"
        segments = sorted(node.wal_dir.glob("wal-*.log"))
        assert segments, f"node {node_id} has no WAL segment in {node.wal_dir}"
        last = segments[-1]
        data = last.read_bytes()
        rng = random.Random(seed)
        if kind == "garbage":
            tail = rng.randbytes(rng.randint(1, 300))
        elif kind == "zeros":
            tail = bytes(rng.randint(1, 4096))
        elif kind == "partial":
            # A copy of the last record's header and part of its payload: what a crash
            # in the middle of appending a record of that size leaves behind.
            offset, length = _last_record(data)
            whole = data[offset : offset + 8 + length]
            tail = whole[: rng.randint(1, len(whole) - 1)]
        else:
            raise ValueError(kind)
        with last.open("ab") as segment:
            segment.write(tail)
        what = f"appended {len(tail)} bytes ({kind}) to {last.name} ({len(data)} bytes)"
        self.note(f"tore the WAL tail of node {node_id}: {what}")
        return what

    # -- status ------------------------------------------------------------------------

    def _reset_channel(self, node: NodeProc) -> None:
        if node.channel is not None:
            node.channel.close()
        node.channel = None

    def _channel(self, node_id: int) -> grpc.Channel:
        node = self.nodes[node_id]
        if node.channel is None:
            node.channel = grpc.secure_channel(
                node.endpoint, self._credentials, options=CHANNEL_OPTIONS
            )
        return node.channel

    def kms(self, node_id: int) -> pb_grpc.KeyManagementServiceStub:
        """A stub talking to one node only (no failover)."""
        return pb_grpc.KeyManagementServiceStub(self._channel(node_id))

    def status(self, node_id: int, timeout: float = 1.0) -> cluster_pb.GetClusterStatusResponse:
        stub = cluster_grpc.ClusterServiceStub(self._channel(node_id))
        return stub.GetClusterStatus(cluster_pb.GetClusterStatusRequest(), timeout=timeout)

    def statuses(
        self, ids: Iterable[int] | None = None
    ) -> dict[int, cluster_pb.GetClusterStatusResponse]:
        found = {}
        for node_id in self.up_nodes() if ids is None else ids:
            with contextlib.suppress(grpc.RpcError):
                found[node_id] = self.status(node_id)
        return found

    def _agreed_leader(self, statuses: dict[int, cluster_pb.GetClusterStatusResponse]) -> int:
        leaders = [s for s in statuses.values() if s.role == _LEADER]
        if not leaders:
            return 0
        top = max(leaders, key=lambda s: s.term)
        backers = [
            s for s in statuses.values() if s.leader_id == top.node_id and s.term == top.term
        ]
        return top.node_id if len(backers) >= self.quorum else 0

    def wait_leader(self, timeout: float = 20.0, among: Iterable[int] | None = None) -> int:
        """A leader that a quorum of the answering nodes follow in its term."""
        deadline = time.monotonic() + timeout
        statuses: dict[int, cluster_pb.GetClusterStatusResponse] = {}
        while time.monotonic() < deadline:
            statuses = self.statuses(among)
            leader = self._agreed_leader(statuses)
            if leader:
                return leader
            time.sleep(POLL_S)
        raise ClusterError(f"no leader within {timeout}s; statuses: {self._brief(statuses)}")

    def wait_converged(self, timeout: float = 30.0) -> int:
        """Waits until every node is up, a leader leads them all, and every node has applied
        exactly the leader's commit index; returns that index."""
        deadline = time.monotonic() + timeout
        statuses: dict[int, cluster_pb.GetClusterStatusResponse] = {}
        while time.monotonic() < deadline:
            statuses = self.statuses(self.nodes)
            leader = self._agreed_leader(statuses)
            if leader and len(statuses) == self.size:
                commit = statuses[leader].commit_index
                if all(
                    s.applied_index == commit and s.commit_index == commit and s.leader_id == leader
                    for s in statuses.values()
                ):
                    return commit
            time.sleep(POLL_S)
        raise ClusterError(f"the nodes did not converge within {timeout}s: {self._brief(statuses)}")

    @staticmethod
    def _brief(statuses: dict[int, cluster_pb.GetClusterStatusResponse]) -> str:
        return (
            "; ".join(
                f"node {i}: {cluster_pb.NodeRole.Name(s.role)} term {s.term} leader {s.leader_id}"
                f" commit {s.commit_index} applied {s.applied_index}"
                for i, s in sorted(statuses.items())
            )
            or "no node answered"
        )

    def list_keys(self, node_id: int, min_commit_index: int = 0, timeout: float = 30.0) -> set[str]:
        """Every key id on one node (ListKeys, a linearizable read), page by page.
        UNAVAILABLE (an election under way) is retried until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._list_keys(node_id, min_commit_index)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(POLL_S)

    def _list_keys(self, node_id: int, min_commit_index: int) -> set[str]:
        stub = self.kms(node_id)
        found: set[str] = set()
        marker = ""
        while True:
            page = stub.ListKeys(
                pb.ListKeysRequest(limit=1000, marker=marker, min_commit_index=min_commit_index),
                timeout=10,
            )
            found.update(k.key_id for k in page.keys)
            if not (page.truncated and page.next_marker):
                return found
            marker = page.next_marker

    # -- logs --------------------------------------------------------------------------

    def log_tail(self, node_id: int, lines: int = 60) -> str:
        path = self.nodes[node_id].log_path
        if not path.exists():
            return f"(no log at {path})"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def logs_report(self, lines: int = 80) -> str:
        parts = [f"cluster root (configs, data, full logs): {self.root}", *self.timeline()]
        for node_id, node in self.nodes.items():
            parts.append(f"---- node {node_id} ({node.log_path}), last {lines} lines ----")
            parts.append(self.log_tail(node_id, lines))
        return "\n".join(parts)

    def grep_logs(self, pattern: str) -> Iterator[tuple[int, str]]:
        regex = re.compile(pattern)
        for node_id, node in self.nodes.items():
            if node.log_path.exists():
                for line in node.log_path.read_text(errors="replace").splitlines():
                    if regex.search(line):
                        yield node_id, line


def _last_record(data: bytes) -> tuple[int, int]:
    """(offset, payload length) of the last whole record of a WAL segment."""
    offset = 0
    last = (0, 0)
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        if length == 0 or offset + 8 + length > len(data):
            break
        last = (offset, length)
        offset += 8 + length
    assert last[1], "the segment holds no record"
    return last
