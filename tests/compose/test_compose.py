"""The deployment path, end to end: base image, kmsd image, dockerd, docker-compose.

What runs (printed as it goes, see it with `-s`):

1. `tools/docker/start-dockerd.sh`: dockerd without default networking (installs
   docker.io and docker-compose with apt if missing); idempotent.
2. `tools/docker/build-image.sh`: `kmsd-base:<release>` by debootstrap + docker import
   (cached), then deploy/Dockerfile (layer cache: seconds when nothing changed).
3. `docker-compose -f deploy/docker-compose.yml -f deploy/compose.test.yml -p kmsdtest`
   with host networking on 127.0.0.1 ports (see deploy/compose.test.yml), and the
   tests below against the containers. `down -v` before (a previous run's leftovers)
   and after, whatever happens.

The single node: kill, crash (restart policy) and a new container on the same volume.
Mutual TLS throughout: the tests connect with the `admin` client certificate, copied out
of the containers (`docker cp`): kms-single makes its own CA and certificates in its
volume; kms-init makes the cluster's (volumes kms-ca and kms-tls).
The three-node cluster: kms-init makes the one root key every node mounts; a leader
is elected; the leader's container is killed and the two others keep serving reads
and writes; restarted, it catches up (it answers, by itself, for the key made while
it was down). The operator procedures of docs/operations.md (replacing a node, growing
to five, backup and restore, a corrupt WAL) are in test_operations.py, on plain
`kmsd serve` processes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from kms.v1 import cluster_service_pb2 as cluster_pb
from kms.v1 import cluster_service_pb2_grpc as cluster_grpc

from kms_client import KmsClient, TlsFiles
from kms_client.errors import KmsClientError

#: Flip to True when `kmsd serve` accepts the cluster configuration (deploy/config/test-*.toml).
CLUSTER_CONFIG_SUPPORTED = True

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
PROJECT = "kmsdtest"
IMAGE = "kmsd:compose-test"
COMPOSE_FILES = ["-f", "deploy/docker-compose.yml", "-f", "deploy/compose.test.yml"]
#: Client endpoints of deploy/config/test-*.toml.
SINGLE_ENDPOINT = "127.0.0.1:17400"
CLUSTER_ENDPOINTS = {
    "kms-a": "127.0.0.1:17401",
    "kms-b": "127.0.0.1:17402",
    "kms-c": "127.0.0.1:17403",
}
CLUSTER_PEER_PORTS = (17501, 17502, 17503)
#: The profiles of deploy/docker-compose.yml.
ALL_PROFILES = ["single"]

HEALTHY_TIMEOUT = 90.0
CATCH_UP_TIMEOUT = 60.0
_T = TypeVar("_T")


def say(message: str) -> None:
    print(f"[compose] {message}", flush=True)


def run(
    cmd: list[str], *, timeout: float, check: bool = True, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Runs `cmd` in the repository with a timeout; prints it and how long it took."""
    say(f"$ {shlex.join(cmd)}")
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        timeout=timeout,
        text=True,
        capture_output=capture,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KMSD_IMAGE": IMAGE},
        check=False,
    )
    say(f"  ({time.monotonic() - started:.1f}s, exit {proc.returncode})")
    if check and proc.returncode != 0:
        output = f"\n{proc.stdout}\n{proc.stderr}" if capture else ""
        raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}{output}")
    return proc


def _docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def _compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if probe.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no docker-compose and no `docker compose` plugin")


def _debian_release() -> str:
    """What tools/docker/build-base-image.sh bootstraps: KMSD_RELEASE, else the host's."""
    if os.environ.get("KMSD_RELEASE"):
        return os.environ["KMSD_RELEASE"]
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    return "bookworm"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Compose:
    """docker-compose on deploy/docker-compose.yml + deploy/compose.test.yml, project kmsdtest."""

    def __init__(self, *profiles: str) -> None:
        self.command = _compose_command() + COMPOSE_FILES + ["-p", PROJECT]
        self.profiles = list(profiles)

    def __call__(
        self,
        *args: str,
        timeout: float = 120,
        capture: bool = False,
        profiles: list[str] | None = None,
    ) -> str:
        flags = [
            f for p in (self.profiles if profiles is None else profiles) for f in ("--profile", p)
        ]
        return run(self.command + flags + list(args), timeout=timeout, capture=capture).stdout or ""

    def down(self) -> None:
        """`down -v` with every profile, so all of the project's containers and volumes go."""
        self("down", "-v", "--remove-orphans", timeout=180, profiles=ALL_PROFILES)

    def container(self, service: str) -> str:
        ids = self("ps", "-a", "-q", service, capture=True).split()
        assert len(ids) == 1, f"expected one container for {service}, got {ids}"
        return ids[0]


def inspect(container: str, template: str) -> str:
    return run(
        ["docker", "inspect", "-f", template, container], timeout=30, capture=True
    ).stdout.strip()


def wait_healthy(container: str, timeout: float = HEALTHY_TIMEOUT) -> None:
    """Polls the container's health (the image's grpc.health.v1 check) until healthy."""
    say(f"waiting (at most {timeout:.0f}s) for {container[:12]} to be healthy")
    started = time.monotonic()
    deadline = started + timeout
    status = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(
            [
                "docker",
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.Health.Status}} exit={{.State.ExitCode}}",
                container,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        status = proc.stdout.strip()
        if status.startswith("running healthy"):
            say(f"  healthy after {time.monotonic() - started:.1f}s")
            return
        # Gone for good, or restarting after a configuration error (exit status 2).
        if status.startswith(("exited", "dead")) or status.endswith(" exit=2"):
            break
        time.sleep(0.25)
    logs = subprocess.run(
        ["docker", "logs", "--tail", "50", container],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    raise AssertionError(
        f"{container[:12]} not healthy (last status: {status!r}); its log:\n"
        f"{logs.stdout}{logs.stderr}"
    )


def eventually(what: str, attempt: Callable[[], _T], timeout: float = CATCH_UP_TIMEOUT) -> _T:
    """Retries `attempt` until it returns without raising, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except Exception as error:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: still failing after {timeout:.0f}s") from error
            time.sleep(0.5)


def client(tls: TlsFiles, *endpoints: str, attempts: int = 1) -> KmsClient:
    return KmsClient(list(endpoints), tls=tls, timeout=5.0, max_attempts=attempts, max_backoff=1.0)


def admin_tls(container: str, directory: str, into: Path) -> TlsFiles:
    """The CA certificate and the admin's certificate and key, copied out of `directory`
    in `container` (running or not) with `docker cp`."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "client-admin.crt", "client-admin.key"):
        run(["docker", "cp", f"{container}:{directory}/{name}", str(into / name)], timeout=60)
    return TlsFiles(into / "ca.crt", into / "client-admin.crt", into / "client-admin.key")


# ---------------------------------------------------------------------------- fixtures


def cannot_run(reason: str) -> None:
    """Skips, or fails when the compose tests are required (KMSD_COMPOSE_TESTS=1, as CI
    sets it), so that a CI machine that cannot run them never passes silently."""
    if os.environ.get("KMSD_COMPOSE_TESTS") == "1":
        pytest.fail(f"KMSD_COMPOSE_TESTS=1 but the compose tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images() -> None:
    """dockerd running, kmsd-base and the kmsd image built (cached on re-runs)."""
    docker_ok = _docker_usable()
    is_root = os.geteuid() == 0
    if not docker_ok and not (is_root and shutil.which("apt-get")):
        cannot_run(
            "needs a usable docker (`docker info`), or root with apt-get to install "
            "docker.io, docker-compose and debootstrap"
        )
    if docker_ok and not is_root:
        has_base = subprocess.run(
            ["docker", "image", "inspect", f"kmsd-base:{_debian_release()}"],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if has_base.returncode != 0:
            cannot_run("the base image kmsd-base:<release> is missing and building it needs root")
    started = time.monotonic()
    run(["tools/docker/start-dockerd.sh"], timeout=600)
    run(["tools/docker/build-image.sh"], timeout=1500)
    say(f"dockerd and images ready in {time.monotonic() - started:.1f}s")


@pytest.fixture
def single(images: None) -> Iterator[Compose]:
    compose = Compose("single")
    compose.down()  # leftovers of an interrupted run
    if not _port_free(17400):
        pytest.fail("127.0.0.1:17400 is in use: the single-node test binds it")
    try:
        compose("up", "-d", "kms-single")
        yield compose
    finally:
        compose.down()


@pytest.fixture
def cluster(images: None) -> Iterator[Compose]:
    if not CLUSTER_CONFIG_SUPPORTED:
        pytest.skip("cluster config not supported yet (flip CLUSTER_CONFIG_SUPPORTED)")
    compose = Compose()
    compose.down()
    busy = [
        port
        for port in [int(e.rpartition(":")[2]) for e in CLUSTER_ENDPOINTS.values()]
        + list(CLUSTER_PEER_PORTS)
        if not _port_free(port)
    ]
    if busy:
        pytest.fail(f"127.0.0.1 ports {busy} are in use: the cluster test binds them")
    try:
        compose("up", "-d", *CLUSTER_ENDPOINTS)
        yield compose
    finally:
        compose.down()


# ------------------------------------------------------------------------------- tests


def test_single_node_survives_kill_crash_and_recreate(single: Compose, tmp_path: Path) -> None:
    container = single.container("kms-single")
    wait_healthy(container)
    tls = admin_tls(container, "/var/lib/kmsd/tls", tmp_path / "tls")

    with client(tls, SINGLE_ENDPOINT) as kms:
        key_id = kms.create_key("compose single-node").key_metadata.key_id
        blob = kms.encrypt(key_id, b"kept across restarts", {"test": "compose"}).ciphertext_blob
        assert kms.decrypt(blob, {"test": "compose"}).plaintext == b"kept across restarts"
    say(f"created key {key_id}, encrypted and decrypted through {SINGLE_ENDPOINT}")

    def still_there(expect_keys: int) -> None:
        with client(tls, SINGLE_ENDPOINT) as kms:
            described = kms.describe_key(key_id).key_metadata
            assert described.key_id == key_id
            assert described.description == "compose single-node"
            assert kms.decrypt(blob, {"test": "compose"}).plaintext == b"kept across restarts"
            assert len(list(kms.iter_keys())) == expect_keys

    # 1. `docker kill` (SIGKILL; Docker counts it as a manual stop: no automatic restart).
    run(["docker", "kill", container], timeout=60, capture=True)
    assert inspect(container, "{{.State.Running}}") == "false"
    with client(tls, SINGLE_ENDPOINT) as kms, pytest.raises(KmsClientError) as refused:
        kms.describe_key(key_id)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    say("while killed: calls fail with UNAVAILABLE")
    run(["docker", "start", container], timeout=60, capture=True)
    wait_healthy(container)
    still_there(expect_keys=1)
    say("after docker kill + docker start: the key and its ciphertext are still good")

    # 2. A crash: SIGKILL to the node's process from outside Docker; the restart policy
    #    (unless-stopped) brings it back by itself.
    restarts = int(inspect(container, "{{.RestartCount}}"))
    pid = int(inspect(container, "{{.State.Pid}}"))
    say(f"SIGKILL to the node's process (host pid {pid})")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while int(inspect(container, "{{.RestartCount}}")) == restarts:
        assert time.monotonic() < deadline, "the restart policy did not restart the node"
        time.sleep(0.25)
    wait_healthy(container)
    with client(tls, SINGLE_ENDPOINT) as kms:
        kms.create_key("after the crash")
    still_there(expect_keys=2)
    say("after a crash: restarted by the restart policy, keys intact, writes work")

    # 3. A new container on the same named volume: the data (and root.key) live there.
    single("rm", "-s", "-f", "kms-single")
    single("up", "-d", "kms-single")
    recreated = single.container("kms-single")
    assert recreated != container
    wait_healthy(recreated)
    still_there(expect_keys=2)
    say("after the container was removed and made anew: the volume kept everything")


def cluster_status(endpoint: str, tls: TlsFiles) -> cluster_pb.GetClusterStatusResponse:
    """One node's own view (ClusterService.GetClusterStatus), served by that node."""
    with grpc.secure_channel(endpoint, tls.credentials()) as channel:
        stub = cluster_grpc.ClusterServiceStub(channel)
        response: cluster_pb.GetClusterStatusResponse = stub.GetClusterStatus(
            cluster_pb.GetClusterStatusRequest(), timeout=3
        )
        return response


def wait_leader(endpoints: dict[str, str], tls: TlsFiles, timeout: float = HEALTHY_TIMEOUT) -> str:
    """Waits until every node in `endpoints` names the same leader, one of them, which
    sees every one of them as a voter; returns the leader's service name."""

    def agreed() -> str:
        views = {service: cluster_status(e, tls) for service, e in endpoints.items()}
        leaders = {v.leader_id for v in views.values()}
        assert len(leaders) == 1 and 0 not in leaders, f"no agreed leader: {leaders}"
        (leader_id,) = leaders
        (leader,) = [s for s, v in views.items() if v.node_id == leader_id]
        voters = {m.node_id for m in views[leader].members if m.voter}
        assert {v.node_id for v in views.values()} <= voters, f"voters {voters}"
        return leader

    started = time.monotonic()
    leader = eventually(f"a leader among {sorted(endpoints)}", agreed, timeout)
    say(f"  leader {leader} after {time.monotonic() - started:.1f}s")
    return leader


def seal_fingerprint(container: str) -> str:
    """The root key's fingerprint a container logged ("seal fingerprint ..." or kms-init's)."""
    logs = run(["docker", "logs", container], timeout=30, capture=True)
    found = re.findall(r"fingerprint ([0-9a-f]{16})", logs.stdout + logs.stderr)
    assert found, f"no seal fingerprint in the log of {container[:12]}"
    return str(found[-1])


def test_cluster_keeps_serving_with_one_node_down(cluster: Compose, tmp_path: Path) -> None:
    containers = {service: cluster.container(service) for service in CLUSTER_ENDPOINTS}
    for container in containers.values():
        wait_healthy(container)
    # kms-init made the CA and the operator's certificate in the kms-ca volume.
    tls = admin_tls(cluster.container("kms-init"), "/var/lib/kmsd-ca", tmp_path / "tls")
    leader = wait_leader(CLUSTER_ENDPOINTS, tls)
    everyone = list(CLUSTER_ENDPOINTS.values())

    # One root key: kms-init made it once; every node loaded that same key.
    init = cluster.container("kms-init")
    assert inspect(init, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    root_key = seal_fingerprint(init)
    fingerprints = {s: seal_fingerprint(c) for s, c in containers.items()}
    assert set(fingerprints.values()) == {root_key}, (root_key, fingerprints)
    say(f"one root key on every node (fingerprint {root_key})")

    with client(tls, *everyone, attempts=10) as kms:
        created = kms.create_key("before the kill")
        key1 = created.key_metadata.key_id
        blob1 = kms.encrypt(key1, b"one", {"n": "1"}).ciphertext_blob
    # Each node on its own decrypts: each unwraps the key material with its own mount
    # of the seal, so this fails on a node with another root key.
    for service, endpoint in CLUSTER_ENDPOINTS.items():
        with client(tls, endpoint, attempts=10) as kms:
            described = kms.describe_key(key1, min_commit_index=created.commit_index)
            assert described.key_metadata.key_id == key1
            assert kms.decrypt(blob1, {"n": "1"}).plaintext == b"one", service
    say(f"key {key1} created; every node describes it and decrypts its ciphertext")

    # Kill the leader: the two others elect a new one and keep serving.
    victim = leader
    run(["docker", "kill", containers[victim]], timeout=60, capture=True)
    assert inspect(containers[victim], "{{.State.Running}}") == "false"
    killed_at = time.monotonic()
    say(f"{victim} (the leader) killed")
    survivors = {s: e for s, e in CLUSTER_ENDPOINTS.items() if s != victim}

    def write_and_read() -> tuple[str, bytes, int]:
        with client(tls, *survivors.values(), attempts=10) as kms:
            created = kms.create_key("while a node was down")
            key = created.key_metadata.key_id
            blob = kms.encrypt(key, b"two", {"n": "2"}).ciphertext_blob
            assert kms.decrypt(blob, {"n": "2"}).plaintext == b"two"
            assert kms.describe_key(key1).key_metadata.key_id == key1
            assert kms.decrypt(blob1, {"n": "1"}).plaintext == b"one"
            return key, blob, created.commit_index

    key2, blob2, key2_index = eventually("writes and reads on the two survivors", write_and_read)
    new_leader = wait_leader(survivors, tls)
    assert new_leader != victim
    say(
        f"the two survivors serve reads and writes {time.monotonic() - killed_at:.1f}s after"
        f" the kill (key {key2} at index {key2_index}; new leader {new_leader})"
    )
    for service, endpoint in survivors.items():
        # attempts=1: answered by this node itself, not by one its hints lead to.
        def knows_key2(endpoint: str = endpoint) -> None:
            with client(tls, endpoint) as kms:
                assert kms.describe_key(key2).key_metadata.key_id == key2
                assert kms.decrypt(blob2, {"n": "2"}).plaintext == b"two"

        eventually(f"describe and decrypt on {service}", knows_key2)

    # Restart the old leader: it catches up from the others.
    run(["docker", "start", containers[victim]], timeout=60, capture=True)
    restarted_at = time.monotonic()
    wait_healthy(containers[victim])

    def caught_up() -> None:
        status = cluster_status(CLUSTER_ENDPOINTS[victim], tls)
        assert status.applied_index >= key2_index, (status.applied_index, key2_index)
        with client(tls, CLUSTER_ENDPOINTS[victim]) as kms:  # this node only
            assert kms.describe_key(key2).key_metadata.key_id == key2
            assert kms.decrypt(blob2, {"n": "2"}).plaintext == b"two"

    eventually(f"{victim} catching up", caught_up)
    say(
        f"{victim} restarted and caught up in {time.monotonic() - restarted_at:.1f}s: it knows"
        " the key made while it was down and decrypts its ciphertext"
    )
    wait_leader(CLUSTER_ENDPOINTS, tls)
    with client(tls, *everyone, attempts=10) as kms:
        kms.create_key("after the restart")
        assert len(list(kms.iter_keys())) == 3
