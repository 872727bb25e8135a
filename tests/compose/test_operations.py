"""The operator procedures of docs/operations.md, run for real: `kmsd init`, `kmsd
serve` processes on loopback (no Docker) and `kmsctl cluster ...`, exactly as the
document tells an operator to:

* replacing a lost node: remove its id, add a NEW id whose node starts empty with
  `[node].join = true` (and the current members listed, to reach them);
* growing from three to five voters, one node at a time;
* backing up one node's data directory (node stopped, the others serving) and
  restoring the WHOLE cluster from that one backup;
* a corrupt WAL: the node refuses to start; it is replaced under a new id.

Mutual TLS throughout, as docs/security.md sets it up: `kmsd certs init|client|node`
make the CA, the operator's `admin` certificate and each node's certificate; kmsctl
runs with KMSD_CA, KMSD_CERT and KMSD_KEY.

Each test prints what it runs (see it with `-s`). Marked `compose` with the Docker
tests: they are the deployment checks `make compose-test` runs; they need no root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from audit_records import audit_records
from kms.v1 import cluster_service_pb2 as cluster_pb
from kms.v1 import cluster_service_pb2_grpc as cluster_grpc

from kms_client import KmsClient, TlsFiles
from kms_client.audit_verify import audit_files, verify
from kms_client.errors import KmsClientError
from kmsd.dev_cluster import free_ports

pytestmark = [pytest.mark.compose, pytest.mark.timeout(300)]

START_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 30.0
_T = TypeVar("_T")


def say(message: str) -> None:
    print(f"[ops] {message}", flush=True)


def until(what: str, attempt: Callable[[], _T], timeout: float = CATCH_UP_TIMEOUT) -> _T:
    """Retries `attempt` until it returns without raising, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except Exception as error:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: still failing after {timeout:.0f}s") from error
            time.sleep(0.2)


def status(endpoint: str, tls: TlsFiles) -> cluster_pb.GetClusterStatusResponse:
    """One node's own view (ClusterService.GetClusterStatus)."""
    with grpc.secure_channel(endpoint, tls.credentials()) as channel:
        response: cluster_pb.GetClusterStatusResponse = cluster_grpc.ClusterServiceStub(
            channel
        ).GetClusterStatus(cluster_pb.GetClusterStatusRequest(), timeout=2)
        return response


class Node:
    """One `kmsd serve` process: its config file, data directory and log."""

    def __init__(self, root: Path, node_id: int, client_port: int, peer_port: int) -> None:
        self.id = node_id
        self.endpoint = f"127.0.0.1:{client_port}"
        self.peer = f"127.0.0.1:{peer_port}"
        self.data_dir = root / f"node-{node_id}"
        self.config = root / f"node-{node_id}.toml"
        self.log = root / f"node-{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls: TlsFiles | None = None  # the operator's, to check on the node

    def write_config(self, cluster: Cluster, members: list[Node], *, join: bool) -> None:
        """The config docs/operations.md shows: founders list every founder; a joining
        node has `join = true` and lists the CURRENT members (where to reach them)."""
        tls = cluster.tls_dir
        if not (tls / f"node-{self.id}.crt").exists():
            kmsd_cli("certs", "node", "--dir", str(tls), "--id", str(self.id))
        self.tls = cluster.tls
        lines = [
            "[node]",
            f"id = {self.id}",
            f'data_dir = "{self.data_dir}"',
            f'listen = "{self.endpoint}"',
            f'peer_listen = "{self.peer}"',
            *(["join = true"] if join else []),
            "",
            "[cluster]",
            f'id = "{cluster.cluster_id}"',
        ]
        for member in members:
            lines += [
                "",
                "[[cluster.members]]",
                f"id = {member.id}",
                f'peer_address = "{member.peer}"',
                f'client_address = "{member.endpoint}"',
            ]
        lines += ["", "[seal]", f'path = "{cluster.seal}"', ""]
        lines += [
            "[tls]",
            f'cert_file = "{tls / f"node-{self.id}.crt"}"',
            f'key_file = "{tls / f"node-{self.id}.key"}"',
            f'ca_file = "{tls / "ca.crt"}"',
            "",
            "[auth]",
            f'administrators = ["{cluster.admin}"]',
            f'operators = ["{cluster.admin}"]',
            "",
        ]
        self.config.write_text("\n".join(lines))

    def start(self) -> Node:
        assert self.proc is None or self.proc.poll() is not None, f"node {self.id} runs"
        say(f"$ kmsd serve --config {self.config.name}   (node {self.id}, {self.endpoint})")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kmsd", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def wait_serving(self) -> None:
        def answers() -> None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.id} exited {self.proc.returncode}")
            assert self.tls is not None
            status(self.endpoint, self.tls)

        try:
            until(f"node {self.id} serving", answers, START_TIMEOUT)
        except AssertionError:
            raise AssertionError(f"node {self.id}'s log:\n{self.log.read_text()}") from None

    def kill(self) -> None:
        """SIGKILL, as when the machine is lost."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self) -> int:
        """SIGTERM (what `docker stop` sends); returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def exits_with(self, timeout: float = START_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Nodes on loopback sharing one root key made by `kmsd init`."""

    def __init__(self, root: Path, max_nodes: int) -> None:
        self.root = root
        self.cluster_id = "ops-test"
        self.seal = root / "seal" / "root.key"
        self.tls_dir = root / "tls"
        self.admin = f"spiffe://{self.cluster_id}/user/admin"
        self.tls = TlsFiles(
            self.tls_dir / "ca.crt",
            self.tls_dir / "client-admin.crt",
            self.tls_dir / "client-admin.key",
        )
        ports = free_ports(2 * max_nodes)
        self.nodes = {
            i: Node(root, i, ports[i - 1], ports[max_nodes + i - 1])
            for i in range(1, max_nodes + 1)
        }

    def init_seal(self) -> None:
        self.seal.parent.mkdir(mode=0o700)
        out = kmsd_cli("init", "--seal", str(self.seal))
        assert "fingerprint" in out
        assert self.seal.stat().st_mode & 0o777 == 0o600
        with pytest.raises(AssertionError, match="refusing to overwrite"):
            kmsd_cli("init", "--seal", str(self.seal))

    def init_tls(self) -> None:
        """The cluster's CA and the operator's client certificate (docs/security.md)."""
        kmsd_cli("certs", "init", "--dir", str(self.tls_dir), "--cluster-id", self.cluster_id)
        out = kmsd_cli("certs", "client", "--dir", str(self.tls_dir), "--name", "admin")
        assert self.admin in out
        assert (self.tls_dir / "client-admin.key").stat().st_mode & 0o777 == 0o600

    def kmsctl(self, *args: str) -> str:
        """kmsctl as the operator: KMSD_CA, KMSD_CERT and KMSD_KEY name the admin's files."""
        env = {
            **os.environ,
            "KMSD_CA": str(self.tls.ca),
            "KMSD_CERT": str(self.tls.cert),
            "KMSD_KEY": str(self.tls.key),
        }
        command = [sys.executable, "-m", "kms_client.cli", *args]
        return _run(command, "kmsctl " + shlex.join(args), env=env)

    def found(self, *ids: int) -> None:
        """Writes the founders' configs (every founder lists all of them) and starts them."""
        founders = [self.nodes[i] for i in ids]
        for node in founders:
            node.write_config(self, founders, join=False)
            node.start()
        for node in founders:
            node.wait_serving()
        self.wait_leader(*ids)

    def endpoints(self, *ids: int) -> list[str]:
        return [self.nodes[i].endpoint for i in ids]

    def running(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.running]

    def wait_leader(self, *ids: int) -> int:
        """Waits until the nodes `ids` agree on a leader among them whose voters are
        exactly `ids` (all caught up); returns its id."""

        def agreed() -> int:
            views = [status(self.nodes[i].endpoint, self.tls) for i in ids]
            leaders = {v.leader_id for v in views}
            assert len(leaders) == 1, leaders
            (leader,) = leaders
            assert leader in ids, leader
            leader_view = status(self.nodes[leader].endpoint, self.tls)
            voters = sorted(m.node_id for m in leader_view.members if m.voter)
            assert voters == sorted(ids), voters
            assert all(m.lag == 0 for m in leader_view.members), leader_view
            return leader

        return until(f"a leader among {ids} with exactly those voters", agreed)

    def wait_leader_among(self, *ids: int) -> int:
        """Waits until the nodes `ids` (the survivors) agree on a leader among them: what
        `kmsctl cluster status` shows before a membership change may be sent."""

        def agreed() -> int:
            leaders = {status(self.nodes[i].endpoint, self.tls).leader_id for i in ids}
            assert len(leaders) == 1 and leaders <= set(ids), leaders
            return leaders.pop()

        return until(f"a leader among {ids}", agreed)

    def client(self, *ids: int, attempts: int = 10) -> KmsClient:
        return KmsClient(
            self.endpoints(*ids),
            tls=self.tls,
            timeout=5.0,
            max_attempts=attempts,
            max_backoff=1.0,
        )

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.stop()


def _run(cmd: list[str], shown: str, env: dict[str, str] | None = None) -> str:
    say(f"$ {shown}")
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
        env=env,
    )
    output = proc.stdout + proc.stderr
    for line in output.rstrip().splitlines():
        say(f"  {line}")
    if proc.returncode != 0:
        raise AssertionError(f"{shown} exited {proc.returncode}: {output}")
    return output


def kmsd_cli(*args: str) -> str:
    return _run([sys.executable, "-m", "kmsd", *args], "kmsd " + shlex.join(args))


def archive(data_dir: Path, tgz: Path) -> None:
    """tar -C DATA_DIR --exclude=./LOCK --exclude=./audit -czf TGZ ."""
    say(f"$ tar -C {data_dir.name} --exclude=./LOCK --exclude=./audit -czf {tgz.name} .")
    with tarfile.open(tgz, "w:gz") as tar:
        for path in sorted(data_dir.iterdir()):
            if path.name not in ("LOCK", "audit"):
                tar.add(path, arcname=f"./{path.name}")


def unpack(tgz: Path, data_dir: Path) -> None:
    """Everything in DATA_DIR but the node's own audit/ removed, then tar -xzf TGZ."""
    say(f"$ find {data_dir.name} -mindepth 1 -maxdepth 1 ! -name audit -exec rm -rf {{}} +")
    say(f"$ tar -C {data_dir.name} -xzf {tgz.name}")
    data_dir.mkdir(mode=0o700, exist_ok=True)
    for path in data_dir.iterdir():
        if path.name != "audit":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    with tarfile.open(tgz) as tar:
        if hasattr(tarfile, "tar_filter"):  # 3.11.4+: keeps owners and modes, no escapes
            tar.extractall(data_dir, filter="tar")
        else:
            tar.extractall(data_dir)  # our own archive


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, max_nodes=5)
    cluster.init_seal()
    cluster.init_tls()
    try:
        yield cluster
    finally:
        for node in cluster.nodes.values():
            if node.running:
                assert node.proc is not None
                node.proc.kill()
                node.proc.wait(timeout=15)


def _on_node_alone(cluster: Cluster, node_id: int, key_id: str, blob: bytes, index: int) -> None:
    """The node `node_id` itself (attempts=1: no failover) knows the key and decrypts."""
    with cluster.client(node_id, attempts=1) as kms:
        described = kms.describe_key(key_id, min_commit_index=index)
        assert described.key_metadata.key_id == key_id
        assert kms.decrypt(blob).plaintext == b"secret"


def _wait_voter(cluster: Cluster, node_id: int, voters: tuple[int, ...]) -> None:
    started = time.monotonic()
    cluster.wait_leader(*voters)
    say(f"node {node_id} is a voter, caught up, {time.monotonic() - started:.1f}s after joining")


def test_replace_a_lost_node(cluster: Cluster) -> None:
    cluster.found(1, 2, 3)
    with cluster.client(1, 2, 3) as kms:
        created = kms.create_key("before the loss")
        key1, index1 = created.key_metadata.key_id, created.commit_index
        blob1 = kms.encrypt(key1, b"secret").ciphertext_blob

    # The leader's machine is lost (the harder case: no leader for a moment): the
    # process dies and its data directory is gone.
    gone = cluster.wait_leader(1, 2, 3)
    kept = tuple(i for i in (1, 2, 3) if i != gone)
    cluster.nodes[gone].kill()
    shutil.rmtree(cluster.nodes[gone].data_dir)
    say(f"node {gone} (the leader) lost: SIGKILL, data directory deleted")
    # 1. The others have a leader (they elect one within 1-2 s).
    cluster.wait_leader_among(*kept)
    everyone = ",".join(cluster.endpoints(1, 2, 3))
    out = cluster.kmsctl("cluster", "--endpoint", everyone, "status")
    assert "unreachable" in out

    # 2. Remove the dead id (the two others are a majority of three: this commits).
    cluster.kmsctl("cluster", "--endpoint", everyone, "remove", "--node-id", str(gone))
    cluster.wait_leader(*kept)
    # 3. Add a NEW id; 4. start it: empty data dir, join = true, the current members.
    new = cluster.nodes[4]
    new.write_config(cluster, [cluster.nodes[i] for i in kept], join=True)
    cluster.kmsctl(
        "cluster",
        "--endpoint",
        ",".join(cluster.endpoints(*kept)),
        "add",
        "--node-id",
        "4",
        "--peer-address",
        new.peer,
        "--client-address",
        new.endpoint,
    )
    new.start().wait_serving()
    # 5. Wait until it is a voter and caught up.
    members = (*kept, 4)
    _wait_voter(cluster, 4, members)
    cluster.kmsctl("cluster", "--endpoint", ",".join(cluster.endpoints(*members)), "status")
    until(
        "node 4 answering for a key made before it joined",
        partial(_on_node_alone, cluster, 4, key1, blob1, index1),
    )

    # The cluster tolerates one failure again: kill the leader, the two others serve.
    leader = cluster.wait_leader(*members)
    cluster.nodes[leader].kill()
    say(f"node {leader} (the leader) killed")
    rest = tuple(i for i in members if i != leader)
    with cluster.client(*rest) as kms:
        created = kms.create_key("after the replacement")
        blob2 = kms.encrypt(created.key_metadata.key_id, b"secret").ciphertext_blob
    for node_id in rest:
        key2 = created.key_metadata.key_id
        until(
            f"node {node_id} answering",
            partial(_on_node_alone, cluster, node_id, key2, blob2, created.commit_index),
        )
    say(f"nodes {rest} serve reads and writes without node {leader}")


def test_grow_from_three_to_five(cluster: Cluster) -> None:
    cluster.found(1, 2, 3)
    with cluster.client(1, 2, 3) as kms:
        created = kms.create_key("three voters")
        blob = kms.encrypt(created.key_metadata.key_id, b"secret").ciphertext_blob
    members = [1, 2, 3]
    for new_id in (4, 5):
        new = cluster.nodes[new_id]
        new.write_config(cluster, [cluster.nodes[i] for i in members], join=True)
        # Here the new node starts first and waits; `cluster add` then brings it in.
        new.start().wait_serving()
        cluster.kmsctl(
            "cluster",
            "--endpoint",
            ",".join(cluster.endpoints(*members)),
            "add",
            "--node-id",
            str(new_id),
            "--peer-address",
            new.peer,
            "--client-address",
            new.endpoint,
        )
        members.append(new_id)
        # One change at a time: the next only once this one is a caught-up voter.
        _wait_voter(cluster, new_id, tuple(members))
    cluster.kmsctl("cluster", "--endpoint", ",".join(cluster.endpoints(*members)), "status")
    for node_id in (4, 5):
        _on_node_alone(cluster, node_id, created.key_metadata.key_id, blob, created.commit_index)

    # Five voters tolerate two failures: kill the leader and one more.
    leader = cluster.wait_leader(*members)
    victims = [leader, next(i for i in members if i != leader)]
    for node_id in victims:
        cluster.nodes[node_id].kill()
    rest = tuple(i for i in members if i not in victims)
    say(f"nodes {victims} killed (the leader among them); {rest} remain")
    with cluster.client(*rest) as kms:
        created = kms.create_key("with two of five down")
        blob = kms.encrypt(created.key_metadata.key_id, b"secret").ciphertext_blob
        assert kms.decrypt(blob).plaintext == b"secret"
    say(f"nodes {rest} serve writes with two of five down")


def test_backup_one_node_restore_the_whole_cluster(cluster: Cluster, tmp_path: Path) -> None:
    cluster.found(1, 2, 3)
    with cluster.client(1, 2, 3) as kms:
        before = kms.create_key("in the backup")
        blob = kms.encrypt(before.key_metadata.key_id, b"secret").ciphertext_blob

    # Backup: stop ONE follower (the others keep serving), copy its data dir, restart.
    leader = cluster.wait_leader(1, 2, 3)
    follower = next(i for i in (1, 2, 3) if i != leader)
    node = cluster.nodes[follower]
    with cluster.client(follower, attempts=1) as kms:  # it has applied the key
        kms.describe_key(before.key_metadata.key_id, min_commit_index=before.commit_index)
    assert node.stop() == 0
    backup = tmp_path / "backup.tgz"
    archive(node.data_dir, backup)
    node.start().wait_serving()
    cluster.wait_leader(1, 2, 3)
    say(f"backup of node {follower}'s data dir taken while nodes 1-3 minus it kept serving")

    with cluster.client(1, 2, 3) as kms:
        after = kms.create_key("after the backup")

    # Disaster: restore EVERY node from that one backup (all stopped first).
    cluster.stop_all()
    for node_id in (1, 2, 3):
        unpack(backup, cluster.nodes[node_id].data_dir)
    for node_id in (1, 2, 3):
        cluster.nodes[node_id].start()
    for node_id in (1, 2, 3):
        cluster.nodes[node_id].wait_serving()
    cluster.wait_leader(1, 2, 3)
    say("the three nodes restored from the one backup elected a leader")

    for node_id in (1, 2, 3):
        until(
            f"node {node_id} serving the backup's key",
            partial(_on_node_alone, cluster, node_id, before.key_metadata.key_id, blob, 0),
        )
        with cluster.client(node_id, attempts=1) as kms, pytest.raises(KmsClientError) as gone:
            kms.describe_key(after.key_metadata.key_id)
        assert gone.value.aws_exception == "NotFoundException"
    with cluster.client(1, 2, 3) as kms:
        restored = kms.create_key("after the restore")
        assert len(list(kms.iter_keys())) == 2
    say("restored: the backup's key is back on every node, the later one is gone, writes work")

    # Each node kept its own audit trail through the restore, and goes on with it.
    def recorded() -> None:
        arns = {
            r["key_arn"]
            for node_id in (1, 2, 3)
            for r in audit_records(cluster.nodes[node_id].data_dir / "audit")
            if r["operation"] == "CreateKey" and r["outcome"] == "ok"
        }
        assert restored.key_metadata.arn in arns

    until("the new key's audit record", recorded)
    cluster.stop_all()
    for node_id in (1, 2, 3):
        trail = verify(audit_files(cluster.nodes[node_id].data_dir / "audit"))
        assert trail.ok and trail.from_genesis, (node_id, trail.first_bad)
    say("every node's audit trail verifies from its first record, across the restore")


def test_corrupt_wal_refuses_to_start_and_is_replaced(cluster: Cluster) -> None:
    cluster.found(1, 2, 3)
    with cluster.client(1, 2, 3) as kms:
        created = [kms.create_key(f"key {n}") for n in range(20)]
        blob = kms.encrypt(created[0].key_metadata.key_id, b"secret").ciphertext_blob
        last = created[-1].commit_index

    victim = cluster.nodes[3]
    with cluster.client(3, attempts=1) as kms:
        kms.describe_key(created[-1].key_metadata.key_id, min_commit_index=last)
    assert victim.stop() == 0
    segments = sorted((victim.data_dir / "raft" / "wal").glob("wal-*.log"))
    assert segments, list(victim.data_dir.rglob("*"))
    segment = segments[-1]
    data = bytearray(segment.read_bytes())
    spot = len(data) // 3  # well before the end: not a torn tail
    data[spot] ^= 0xFF
    segment.write_bytes(bytes(data))
    say(f"flipped one byte at offset {spot} of {segment.name} ({len(data)} bytes)")

    victim.start()
    code = victim.exits_with()
    log = victim.log.read_text()
    say(f"node 3 exited {code}: {log.strip().splitlines()[-1]}")
    assert code == 1
    assert "cannot start" in log

    # Replace it: remove id 3, wipe, add id 5 with an empty data dir.
    cluster.wait_leader_among(1, 2)
    cluster.kmsctl(
        "cluster", "--endpoint", ",".join(cluster.endpoints(1, 2)), "remove", "--node-id", "3"
    )
    shutil.rmtree(victim.data_dir)
    new = cluster.nodes[5]
    new.write_config(cluster, [cluster.nodes[1], cluster.nodes[2]], join=True)
    cluster.kmsctl(
        "cluster",
        "--endpoint",
        ",".join(cluster.endpoints(1, 2)),
        "add",
        "--node-id",
        "5",
        "--peer-address",
        new.peer,
        "--client-address",
        new.endpoint,
    )
    new.start().wait_serving()
    _wait_voter(cluster, 5, (1, 2, 5))
    first = created[0].key_metadata.key_id
    until("node 5 answering", partial(_on_node_alone, cluster, 5, first, blob, last))
