"""The etcd side of the cluster benchmark: install, a 3-member cluster on loopback, stubs.

* `ensure_etcd()` installs Debian's `etcd-server` with apt-get if `etcd` is missing
  (root only), and returns the binary's path and version.
* `etcd_stubs(tmp)` compiles a minimal, hand-written subset of etcd's v3 API
  (`etcdserverpb/rpc.proto`: KV.Put and Maintenance.Status, same package, service,
  method names and field numbers as upstream, unused fields left out) with
  grpcio-tools into `tmp` and imports it. Nothing generated is committed.
* `EtcdCluster` starts three `etcd` members on 127.0.0.1 with separate data
  directories and etcd's defaults (fsync on, heartbeat 100 ms, election 1000 ms),
  waits until they agree on a leader, and finds it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import grpc

from bench.cluster_procs import Child, Children, free_ports

__all__ = ["ETCD_PROTO", "EtcdCluster", "EtcdUnavailable", "ensure_etcd", "etcd_stubs"]

# A subset of go.etcd.io/etcd/etcdserver/etcdserverpb/rpc.proto (v3.4): the names and
# field numbers below are upstream's; the fields and RPCs omitted are not used here.
ETCD_PROTO = """\
syntax = "proto3";
package etcdserverpb;

message ResponseHeader {
  uint64 cluster_id = 1;
  uint64 member_id = 2;
  int64 revision = 3;
  uint64 raft_term = 4;
}

message PutRequest {
  bytes key = 1;
  bytes value = 2;
}

message PutResponse {
  ResponseHeader header = 1;
}

message StatusRequest {}

message StatusResponse {
  ResponseHeader header = 1;
  string version = 2;
  int64 dbSize = 3;
  uint64 leader = 4;
  uint64 raftIndex = 5;
  uint64 raftTerm = 6;
}

service KV {
  rpc Put(PutRequest) returns (PutResponse) {}
}

service Maintenance {
  rpc Status(StatusRequest) returns (StatusResponse) {}
}
"""

START_TIMEOUT = 60.0


class EtcdUnavailable(RuntimeError):
    """etcd is not installed and could not be installed."""


def ensure_etcd(install: bool = True) -> tuple[str, str]:
    """The path and version of `etcd`, installing Debian's etcd-server if needed."""
    path = shutil.which("etcd")
    if path is None and install:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise EtcdUnavailable("etcd is not installed and apt-get as root is not available")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print("bench: installing etcd-server with apt-get", file=sys.stderr, flush=True)
        install_cmd = ["apt-get", "install", "-y", "-q", "etcd-server"]
        done = subprocess.run(install_cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            # The package lists may be missing (fresh container): update once and retry.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install_cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise EtcdUnavailable(f"apt-get install etcd-server failed:\n{done.stderr[-2000:]}")
        path = shutil.which("etcd")
    if path is None:
        raise EtcdUnavailable("etcd is not installed")
    version = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    return path, (version[0].split(":", 1)[-1].strip() if version else "unknown")


def etcd_stubs(tmp: Path) -> tuple[ModuleType, ModuleType]:
    """Compiles ETCD_PROTO into `tmp` and returns its (pb2, pb2_grpc) modules."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "bench_etcd_rpc.proto").write_text(ETCD_PROTO)
    status = protoc.main(
        [
            "protoc",
            f"-I{tmp}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(tmp / "bench_etcd_rpc.proto"),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) on the etcd proto subset")
    sys.path.insert(0, str(tmp))
    try:
        return (
            importlib.import_module("bench_etcd_rpc_pb2"),
            importlib.import_module("bench_etcd_rpc_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(tmp))


class EtcdCluster:
    """Three etcd members on loopback, each with its own data directory."""

    def __init__(
        self, binary: str, root: Path, children: Children, pb: ModuleType, pb_grpc: ModuleType
    ) -> None:
        self.binary = binary
        self.root = root
        self.children = children
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.members: list[Child] = []
        self.endpoints: list[str] = []

    @property
    def pids(self) -> list[int]:
        return [member.pid for member in self.members]

    def start(self, size: int = 3) -> EtcdCluster:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        clients, peers = ports[:size], ports[size:]
        initial = ",".join(f"e{i + 1}=http://127.0.0.1:{peers[i]}" for i in range(size))
        # A clean environment: ETCD_* variables of the caller would change the setup.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        for i in range(size):
            name = f"e{i + 1}"
            argv = [
                self.binary,
                f"--name={name}",
                f"--data-dir={self.root / name}",
                f"--listen-client-urls=http://127.0.0.1:{clients[i]}",
                f"--advertise-client-urls=http://127.0.0.1:{clients[i]}",
                f"--listen-peer-urls=http://127.0.0.1:{peers[i]}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peers[i]}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                "--initial-cluster-token=kmsd-bench",
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=warn",
            ]
            self.members.append(
                self.children.add(
                    Child(f"etcd {name}", argv, self.root / f"{name}.log", env).start()
                )
            )
        self.endpoints = [f"127.0.0.1:{port}" for port in clients]
        self.leader_endpoint(time.monotonic() + START_TIMEOUT)
        return self

    def leader_endpoint(self, deadline: float) -> str:
        """The client endpoint of the member all members name as leader."""
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    raise RuntimeError(
                        f"{member.name} exited; see {member.log_path}:\n{member.log_tail()}"
                    )
            leaders: set[int] = set()
            own: dict[int, str] = {}
            try:
                for endpoint in self.endpoints:
                    with grpc.insecure_channel(endpoint) as channel:
                        status = self.pb_grpc.MaintenanceStub(channel).Status(
                            self.pb.StatusRequest(), timeout=1
                        )
                    leaders.add(status.leader)
                    own[status.header.member_id] = endpoint
            except grpc.RpcError:
                leaders = set()
            if len(leaders) == 1 and (leader := leaders.pop()) in own:
                return own[leader]
            time.sleep(0.1)  # polling pace while the members elect a leader
        raise RuntimeError(f"etcd elected no leader in time; see {self.root}/e*.log")
