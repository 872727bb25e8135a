"""`kmsd dev --nodes N`: a local N-node cluster on loopback, one `kmsd serve` process per
node, each with its own data directory and config file, sharing one file seal.

The supervisor writes `<dir>/node-<i>.toml`, starts the nodes, waits until every
node answers health checks and a leader is elected, prints the endpoints, and
stops the nodes on Ctrl-C / SIGTERM. Node logs go to `<dir>/node-<i>.log`.

Mutual TLS by default: on first start `<dir>/tls/` gets a CA, one certificate per
node and an `admin` client certificate (kept afterwards), and the admin is the
cluster's administrator and operator. `--plaintext` serves without TLS on loopback,
where every caller is `anonymous` (then the administrator).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kms.v1 import cluster_service_pb2 as cluster_pb
from kms.v1 import cluster_service_pb2_grpc as cluster_grpc

from kmsd.auth.certs import DevPki, ensure_dev_pki
from kmsd.crypto.seal import FileSeal

START_TIMEOUT_S = 60.0
DEV_CLUSTER_ID = "kmsd-dev"
PLAINTEXT_WARNING = "plaintext: no authentication, loopback only"


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now (another process could still take them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def dev_pki(root: Path, nodes: int, plaintext: bool) -> DevPki | None:
    """The dev cluster's certificates under `<root>/tls` (made when missing); None for
    `--plaintext`."""
    if plaintext:
        return None
    return ensure_dev_pki(root / "tls", DEV_CLUSTER_ID, range(1, nodes + 1))


def security_tables(pki: DevPki | None, node_id: int) -> dict[str, dict[str, object]]:
    """The `[tls]` and `[auth]` tables of a dev node: its certificate and the admin as
    administrator and operator; or plaintext, with `anonymous` in those roles."""
    if pki is None:
        everyone = ["anonymous"]
        return {
            "tls": {"plaintext": True},
            "auth": {"administrators": everyone, "operators": everyone},
        }
    files = pki.nodes[node_id]
    return {
        "tls": {
            "cert_file": str(files.cert),
            "key_file": str(files.key),
            "ca_file": str(pki.ca.cert),
        },
        "auth": {"administrators": [pki.admin_principal], "operators": [pki.admin_principal]},
    }


def security_toml(pki: DevPki | None, node_id: int) -> str:
    """`security_tables` as TOML."""
    lines = []
    for section, table in security_tables(pki, node_id).items():
        lines.append(f"\n[{section}]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in table.items()]
    return "\n".join(lines) + "\n"


def dev_credentials(pki: DevPki) -> grpc.ChannelCredentials:
    """Channel credentials of the dev cluster's admin."""
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=pki.admin.key.read_bytes(),
        certificate_chain=pki.admin.cert.read_bytes(),
    )


def banner(
    what: str, endpoints: list[str], root: Path, pki: DevPki | None, commands: list[str]
) -> str:
    """What `kmsd dev` prints once it serves (tests parse "serving on HOST:PORT,...")."""
    joined = ",".join(endpoints)
    lines = [f"kmsd dev: {what} serving on {joined} (data in {root})"]
    if pki is None:
        lines += [
            f"  WARNING: {PLAINTEXT_WARNING} (every caller is 'anonymous')",
            f"  try:  export KMSD_ENDPOINT={joined} KMSD_NO_TLS=1",
        ]
    else:
        lines += [
            f"  mutual TLS: CA {pki.ca.cert}",
            f"    admin ({pki.admin_principal}): certificate {pki.admin.cert}",
            f"    key {pki.admin.key}",
            f"  try:  export KMSD_ENDPOINT={joined}",
            f"        export KMSD_CA={pki.ca.cert}",
            f"        export KMSD_CERT={pki.admin.cert} KMSD_KEY={pki.admin.key}",
        ]
    lines += [f"        kmsctl {command}" for command in commands]
    return "\n".join(lines)


def node_config(
    root: Path,
    node_id: int,
    clients: list[int],
    peers: list[int],
    scheduler_interval: float,
    pki: DevPki | None,
) -> str:
    """The TOML config of node `node_id` of the dev cluster (`pki` None: plaintext)."""
    members = "".join(
        f"\n[[cluster.members]]\nid = {i}\n"
        f'peer_address = "127.0.0.1:{peers[i - 1]}"\n'
        f'client_address = "127.0.0.1:{clients[i - 1]}"\n'
        for i in range(1, len(clients) + 1)
    )
    return (
        "# Written by `kmsd dev`; edits are overwritten at the next start.\n"
        f"[node]\nid = {node_id}\n"
        f'data_dir = "{root / f"node-{node_id}"}"\n'
        f'listen = "127.0.0.1:{clients[node_id - 1]}"\n'
        f'peer_listen = "127.0.0.1:{peers[node_id - 1]}"\n'
        f'\n[seal]\ntype = "file"\npath = "{root / "root.key"}"\n'
        f"\n[scheduler]\ninterval_seconds = {scheduler_interval}\n"
        f'\n[cluster]\nid = "{DEV_CLUSTER_ID}"\n{members}'
        f"{security_toml(pki, node_id)}"
    )


def _channel(endpoint: str, pki: DevPki | None) -> grpc.Channel:
    if pki is None:
        return grpc.insecure_channel(endpoint)
    return grpc.secure_channel(endpoint, dev_credentials(pki))


def _ready(endpoints: list[str], deadline: float, pki: DevPki | None) -> bool:
    """True once every node is SERVING and all of them know the same leader."""
    while time.monotonic() < deadline:
        try:
            leaders: set[int] = set()
            for endpoint in endpoints:
                with _channel(endpoint, pki) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    # The typeshed stub of HealthStub omits its methods.
                    health = stub.Check(  # type: ignore[attr-defined]
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if health.status != health_pb2.HealthCheckResponse.SERVING:
                        raise ConnectionError(endpoint)
                    status = cluster_grpc.ClusterServiceStub(channel).GetClusterStatus(
                        cluster_pb.GetClusterStatusRequest(), timeout=1
                    )
                    leaders.add(status.leader_id)
            if len(leaders) == 1 and 0 not in leaders:
                return True
        except (grpc.RpcError, ConnectionError):
            pass
        time.sleep(0.1)  # a pacing interval for polling, not a wait for state
    return False


def run_dev_cluster(
    root: Path,
    nodes: int,
    first_port: int,
    first_peer_port: int,
    scheduler_interval: float,
    *,
    plaintext: bool = False,
) -> int:
    """Runs the cluster until a signal; returns the exit status."""
    root = root.resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    FileSeal.load_or_create(root / "root.key")
    pki = dev_pki(root, nodes, plaintext)
    if pki is None:
        print(f"kmsd dev: WARNING: {PLAINTEXT_WARNING}", file=sys.stderr, flush=True)
    if first_port == 0:
        ports = free_ports(2 * nodes)
        clients, peers = ports[:nodes], ports[nodes:]
    else:
        clients = [first_port + i for i in range(nodes)]
        peers = [first_peer_port + i for i in range(nodes)]
    processes: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for node_id in range(1, nodes + 1):
            config = root / f"node-{node_id}.toml"
            config.write_text(node_config(root, node_id, clients, peers, scheduler_interval, pki))
            with (root / f"node-{node_id}.log").open("ab") as log_file:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "kmsd", "serve", "--config", str(config)],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                )
        endpoints = [f"127.0.0.1:{port}" for port in clients]
        if not _ready(endpoints, time.monotonic() + START_TIMEOUT_S, pki):
            print(f"kmsd dev: the cluster did not come up; see {root}/node-*.log", file=sys.stderr)
            return 1
        print(
            banner(
                f"{nodes}-node cluster",
                endpoints,
                root,
                pki,
                ["create-key --description demo", "cluster status"],
            )
            + f"\n  logs: {root}/node-*.log   stop: Ctrl-C",
            flush=True,
        )
        reported: set[int] = set()
        while not stop.wait(0.5):
            for node_id, process in enumerate(processes, start=1):
                if process.poll() is not None and node_id not in reported:
                    reported.add(node_id)  # the others keep serving: that is the point
                    print(
                        f"kmsd dev: node {node_id} exited with {process.returncode};"
                        f" see {root}/node-{node_id}.log",
                        file=sys.stderr,
                        flush=True,
                    )
        return 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
