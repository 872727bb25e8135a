"""The kmsd side of the cluster benchmark: a 3-node cluster whose processes we own.

`kmsd dev --nodes 3` would do for throughput, but failover needs each node's pid
(to SIGKILL the leader) and a way to restart one node on its own data, so the
benchmark writes the configs itself (the same shape `kmsd dev` writes, all Raft
timing left at kmsd's defaults), creates the shared root key with `kmsd init`, and
starts one `python -m kmsd serve --config` per node.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kms.v1 import cluster_service_pb2 as cluster_pb
from kms.v1 import cluster_service_pb2_grpc as cluster_grpc

from bench.cluster_procs import REPO_ROOT, Child, Children, free_ports

__all__ = ["KmsdCluster"]

START_TIMEOUT = 60.0


class KmsdCluster:
    """`size` kmsd nodes on loopback sharing one file seal; node ids are 1..size.
    `replicated=False` (one node only): a node without `[[cluster.members]]`, i.e. on
    its single-node log, without Raft: what kmsd costs when nothing is replicated."""

    def __init__(
        self,
        root: Path,
        children: Children,
        size: int = 3,
        replicated: bool = True,
        *,
        source: Path = REPO_ROOT,
        extra_config: str = "",
    ) -> None:
        """`source`: the kmsd source tree to run (this one by default); `extra_config`:
        TOML appended to every node's config."""
        if not replicated and size != 1:
            raise ValueError("only a single node runs unreplicated")
        self.source = source
        self.extra_config = extra_config
        self.root = root
        self.children = children
        self.size = size
        self.replicated = replicated
        self.nodes: dict[int, Child] = {}
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(1, self.size + 1)]

    def endpoint(self, node_id: int) -> str:
        return f"127.0.0.1:{self.client_ports[node_id - 1]}"

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.nodes.values() if child.running]

    def _config(self, node_id: int) -> str:
        members = "".join(
            f"\n[[cluster.members]]\nid = {i}\n"
            f'peer_address = "127.0.0.1:{self.peer_ports[i - 1]}"\n'
            f'client_address = "127.0.0.1:{self.client_ports[i - 1]}"\n'
            for i in range(1, self.size + 1)
            if self.replicated
        )
        peer_listen = (
            f'peer_listen = "127.0.0.1:{self.peer_ports[node_id - 1]}"\n' if self.replicated else ""
        )
        return (
            "# Written by bench.cluster.\n"
            f"[node]\nid = {node_id}\n"
            f'data_dir = "{self.root / f"node-{node_id}"}"\n'
            f'listen = "127.0.0.1:{self.client_ports[node_id - 1]}"\n'
            f"{peer_listen}"
            f'\n[seal]\ntype = "file"\npath = "{self.root / "root.key"}"\n'
            # Plaintext on loopback, the caller (anonymous) allowed everything: etcd runs
            # without TLS or auth here too, and TLS costs any gRPC service alike.
            "\n[tls]\nplaintext = true\n"
            '\n[auth]\nadministrators = ["anonymous"]\noperators = ["anonymous"]\n'
            f'\n[cluster]\nid = "kmsd-bench"\n{members}'
            f"{self.extra_config}"
        )

    def start(self) -> KmsdCluster:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        ports = free_ports(2 * self.size)
        self.client_ports, self.peer_ports = ports[: self.size], ports[self.size :]
        seal = self.root / "root.key"
        done = subprocess.run(
            [sys.executable, "-m", "kmsd", "init", "--seal", str(seal)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.source,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kmsd init failed: {done.stdout}{done.stderr}")
        for node_id in range(1, self.size + 1):
            (self.root / f"node-{node_id}.toml").write_text(self._config(node_id))
            self.start_node(node_id)
        self.wait_ready(time.monotonic() + START_TIMEOUT)
        return self

    def start_node(self, node_id: int) -> Child:
        argv = [
            sys.executable, "-m", "kmsd", "serve",
            "--config", str(self.root / f"node-{node_id}.toml"),
        ]  # fmt: skip
        log_path = self.root / f"node-{node_id}.log"
        child = Child(f"kmsd node {node_id}", argv, log_path, source=self.source).start()
        self.nodes[node_id] = self.children.add(child)
        return child

    def kill_node(self, node_id: int) -> None:
        """SIGKILL: no shutdown, no flush; what a crash or an OOM kill does."""
        self.nodes[node_id].kill()

    def status(self, node_id: int, timeout: float = 1.0) -> cluster_pb.GetClusterStatusResponse:
        with grpc.insecure_channel(self.endpoint(node_id)) as channel:
            return cluster_grpc.ClusterServiceStub(channel).GetClusterStatus(
                cluster_pb.GetClusterStatusRequest(), timeout=timeout
            )

    def _serving(self, node_id: int) -> bool:
        with grpc.insecure_channel(self.endpoint(node_id)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            health = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)  # type: ignore[attr-defined]
            return bool(health.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, deadline: float) -> int:
        """Waits until every running node serves and names the same running leader, and
        every running node has applied what the leader had committed; returns its id."""
        while time.monotonic() < deadline:
            for child in self.nodes.values():
                if child.proc is not None and not child.running:
                    raise RuntimeError(
                        f"{child.name} exited; see {child.log_path}:\n{child.log_tail()}"
                    )
            live = [i for i, child in self.nodes.items() if child.running]
            try:
                statuses = {}
                for node_id in live:
                    if not self._serving(node_id):
                        raise ConnectionError(node_id)
                    statuses[node_id] = self.status(node_id)
                leaders = {s.leader_id for s in statuses.values()}
                if len(leaders) == 1 and (leader := leaders.pop()) in statuses:
                    commit = statuses[leader].commit_index
                    if all(s.applied_index >= commit for s in statuses.values()):
                        return leader
            except (grpc.RpcError, ConnectionError):
                pass
            time.sleep(0.05)  # polling pace while the nodes start and elect
        raise RuntimeError(f"the kmsd cluster was not ready in time; see {self.root}/node-*.log")

    def leader(self) -> int:
        return self.wait_ready(time.monotonic() + START_TIMEOUT)
