"""`kmsd serve` with the pkcs11 seal against a real SoftHSM2 token: a single node that
creates its root key in the token and keeps decrypting across restarts, and a 3-node
cluster whose nodes share one token's key — the cluster keeps serving when the
HSM-backed node set restarts. Skipped (failed under CI) only if SoftHSM2 is missing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kms.v1 import cluster_service_pb2 as cpb
from kms.v1 import cluster_service_pb2_grpc as cpb_grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kmsd.auth.certs import DevPki, ensure_dev_pki
from kmsd.dev_cluster import DEV_CLUSTER_ID, free_ports, node_config, security_toml
from kmsd_process import secure_channel

pytestmark = [pytest.mark.e2e, pytest.mark.hsm]

REPO = Path(__file__).resolve().parents[2]
SETUP_TOKEN = REPO / "tools" / "softhsm" / "setup-token.sh"
SEAL_KEY = REPO / "tools" / "softhsm" / "seal-key.py"
_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "kmsd-e2e"
PIN = "e2e-pin-5678"
PIN_ENV = "KMSD_E2E_HSM_PIN"
START_TIMEOUT_S = 60.0
CONTEXT = {"purpose": "hsm-e2e"}
_FINGERPRINT = re.compile(r"seal fingerprint ([0-9a-f]{16})")
_SEAL_SECTION = re.compile(r'\n\[seal\]\ntype = "file"\npath = "[^"\n]*"\n')


def _softhsm_module() -> str:
    candidates = [os.environ.get("SOFTHSM2_MODULE", ""), *_MODULE_CANDIDATES]
    module = next((c for c in candidates if c and os.path.exists(c)), "")
    if module and shutil.which("softhsm2-util"):
        return module
    reason = "SoftHSM2 is not installed (apt-get install softhsm2; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class Hsm:
    """A private SoftHSM2 token directory, made by tools/softhsm/setup-token.sh."""

    def __init__(self, directory: Path) -> None:
        self.module = _softhsm_module()
        self.directory = directory
        self.pin_file = directory / "user.pin"
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        subprocess.run(
            [str(SETUP_TOKEN), str(directory), "--label", TOKEN, "--pin-file", str(self.pin_file)],
            check=True,
            capture_output=True,
        )
        self.conf = directory / "softhsm2.conf"

    def seal_table(self, key_label: str, *, create_key: bool, pin_from_env: bool) -> str:
        pin = f'pin_env = "{PIN_ENV}"' if pin_from_env else f'pin_file = "{self.pin_file}"'
        return (
            f'\n[seal]\ntype = "pkcs11"\nmodule = "{self.module}"\n'
            f'token_label = "{TOKEN}"\nkey_label = "{key_label}"\n{pin}\n'
            f"create_key = {'true' if create_key else 'false'}\n"
        )


class ServeProcess:
    """One `kmsd serve --config FILE` process; its log outlives restarts."""

    def __init__(self, config: Path, endpoint: str, hsm: Hsm, pki: DevPki) -> None:
        self.config = config
        self.endpoint = endpoint
        self.pki = pki
        self.log = config.with_suffix(".log")
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SOFTHSM2_CONF": str(hsm.conf),
            PIN_ENV: PIN,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> ServeProcess:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kmsd", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def output(self) -> str:
        """What this process (the latest start) has logged."""
        with self.log.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    def fingerprint(self) -> str:
        match = _FINGERPRINT.search(self.output())
        assert match, f"no seal fingerprint in {self.log}:\n{self.output()}"
        return match.group(1)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self.proc = None
        return code


def _serving(node: ServeProcess, clustered: bool) -> int | None:
    """The leader id the node knows (0 = none yet) once it is SERVING; None before."""
    with secure_channel(node.endpoint, node.pki) as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=1
            )
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            if not clustered:
                return 1
            status = cpb_grpc.ClusterServiceStub(channel).GetClusterStatus(
                cpb.GetClusterStatusRequest(), timeout=1
            )
            return int(status.leader_id)
        except grpc.RpcError:
            return None


def wait_ready(nodes: list[ServeProcess], clustered: bool) -> None:
    """Polls (with a deadline) until every node serves and, in a cluster, all of them
    name the same leader; fails at once, with the log, if a node exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for node in nodes:
            if node.exited() is not None:
                pytest.fail(f"{node.config.name} exited with {node.exited()}:\n{node.output()}")
        leaders = {_serving(node, clustered) for node in nodes}
        if None not in leaders and 0 not in leaders and len(leaders) == 1:
            return
        time.sleep(0.1)  # pacing between polls, not a wait for state
    logs = "\n".join(f"--- {n.config.name}\n{n.output()}" for n in nodes)
    pytest.fail(f"the nodes did not become ready in {START_TIMEOUT_S}s:\n{logs}")


def _stub(node: ServeProcess, channels: list[grpc.Channel]) -> pb_grpc.KeyManagementServiceStub:
    channel = secure_channel(node.endpoint, node.pki)
    channels.append(channel)
    return pb_grpc.KeyManagementServiceStub(channel)


@pytest.fixture()
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for channel in opened:
        channel.close()


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    return Hsm(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Certificates as `kmsd dev` makes them: nodes 1-3 and the admin client."""
    return ensure_dev_pki(tmp_path_factory.mktemp("tls"), DEV_CLUSTER_ID, [1, 2, 3])


def _single_config(root: Path, port: int, seal: str, pki: DevPki) -> Path:
    config = root / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{root / "data"}"\nlisten = "127.0.0.1:{port}"\n'
        f'log_level = "INFO"\n{seal}{security_toml(pki, 1)}'
    )
    return config


def test_single_node_creates_its_key_in_the_hsm_and_survives_restart(
    hsm: Hsm, pki: DevPki, tmp_path: Path, channels: list[grpc.Channel]
) -> None:
    (port,) = free_ports(1)
    seal = hsm.seal_table("single-root", create_key=True, pin_from_env=False)
    node = ServeProcess(_single_config(tmp_path, port, seal, pki), f"127.0.0.1:{port}", hsm, pki)
    try:
        node.start()
        wait_ready([node], clustered=False)
        first_fingerprint = node.fingerprint()
        stub = _stub(node, channels)
        key_id = stub.CreateKey(pb.CreateKeyRequest(description="hsm")).key_metadata.key_id
        blob = stub.Encrypt(
            pb.EncryptRequest(
                key_id=key_id, plaintext=b"sealed by the HSM", encryption_context=CONTEXT
            )
        ).ciphertext_blob
        out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT))
        assert out.plaintext == b"sealed by the HSM" and out.key_id.endswith(key_id)
        assert node.stop() == 0

        # The stored material is wrapped by the token's key: restart and decrypt again
        # (create_key = true must find the existing key, not make a second one).
        node.start()
        wait_ready([node], clustered=False)
        assert node.fingerprint() == first_fingerprint
        stub = _stub(node, channels)
        out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT))
        assert out.plaintext == b"sealed by the HSM"
        rotated = stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key_id))
        assert rotated.key_id.endswith(key_id)
        blob2 = stub.Encrypt(pb.EncryptRequest(key_id=key_id, plaintext=b"v2")).ciphertext_blob
        assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob2)).plaintext == b"v2"
    finally:
        node.stop()
    assert "sealed by the HSM" not in node.log.read_text()
    assert not list(tmp_path.rglob("root.key"))  # no file seal was made


def test_start_up_errors_name_the_seal_option(hsm: Hsm, pki: DevPki, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cases = [
        (
            hsm.seal_table("never-created", create_key=False, pin_from_env=False),
            1,
            "[seal].key_label: token 'kmsd-e2e' has no secret key labelled 'never-created'",
        ),
        (
            hsm.seal_table("x", create_key=True, pin_from_env=False).replace(
                f'token_label = "{TOKEN}"', 'token_label = "no-such-token"'
            ),
            1,
            "[seal].token_label: no token labelled 'no-such-token'",
        ),
        (
            hsm.seal_table("x", create_key=True, pin_from_env=False).replace(
                "create_key", f'pin_env = "{PIN_ENV}"\ncreate_key'
            ),
            2,
            "[seal].pin_file: set exactly one of pin_file and pin_env",
        ),
    ]
    for seal, status, message in cases:
        config = _single_config(tmp_path, port, seal, pki)
        node = ServeProcess(config, f"127.0.0.1:{port}", hsm, pki)
        node.start()
        assert node.wait_exit() == status
        assert message in node.output()
        assert PIN not in node.output()


def _cluster_configs(root: Path, hsm: Hsm, pki: DevPki) -> list[tuple[Path, str]]:
    ports = free_ports(6)
    clients, peers = ports[:3], ports[3:]
    configs = []
    for node_id in (1, 2, 3):
        text = node_config(root, node_id, clients, peers, 5.0, pki)
        seal = hsm.seal_table("cluster-root", create_key=False, pin_from_env=True)
        (section,) = _SEAL_SECTION.findall(text)
        text = text.replace(section, seal)
        path = root / f"node-{node_id}.toml"
        path.write_text(text)
        configs.append((path, f"127.0.0.1:{clients[node_id - 1]}"))
    return configs


def test_three_nodes_share_one_token_key_and_survive_a_full_restart(
    hsm: Hsm, pki: DevPki, tmp_path: Path, channels: list[grpc.Channel]
) -> None:
    nodes = [
        ServeProcess(path, endpoint, hsm, pki)
        for path, endpoint in _cluster_configs(tmp_path, hsm, pki)
    ]
    try:
        # Generate the shared key once, before any node starts (docs/hsm.md), with the
        # tool that also prints the fingerprint every node must then log.
        made = subprocess.run(
            [sys.executable, str(SEAL_KEY), "--config", str(nodes[0].config), "--create"],
            capture_output=True,
            text=True,
            env=nodes[0].env,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        expected = made.stdout.strip().rpartition("fingerprint ")[2]
        for node in nodes:
            node.start()
        wait_ready(nodes, clustered=True)
        fingerprints = {node.fingerprint() for node in nodes}
        assert fingerprints == {expected}

        stubs = [_stub(node, channels) for node in nodes]
        created = stubs[0].CreateKey(pb.CreateKeyRequest(description="shared via HSM"))
        key_id = created.key_metadata.key_id
        blob = (
            stubs[0]
            .Encrypt(
                pb.EncryptRequest(
                    key_id=key_id,
                    plaintext=b"cluster secret",
                    encryption_context=CONTEXT,
                    min_commit_index=created.commit_index,
                )
            )
            .ciphertext_blob
        )
        for stub in stubs[1:]:
            out = stub.Decrypt(
                pb.DecryptRequest(
                    ciphertext_blob=blob,
                    encryption_context=CONTEXT,
                    min_commit_index=created.commit_index,
                )
            )
            assert out.plaintext == b"cluster secret"

        # The whole HSM-backed node set restarts at once; the cluster keeps serving.
        for node in nodes:
            assert node.stop() == 0
        for node in nodes:
            node.start()
        wait_ready(nodes, clustered=True)
        assert {node.fingerprint() for node in nodes} == fingerprints
        stubs = [_stub(node, channels) for node in nodes]
        for stub in stubs:
            out = stub.Decrypt(
                pb.DecryptRequest(
                    ciphertext_blob=blob,
                    encryption_context=CONTEXT,
                    min_commit_index=created.commit_index,
                )
            )
            assert out.plaintext == b"cluster secret"
        again = stubs[1].Encrypt(pb.EncryptRequest(key_id=key_id, plaintext=b"after restart"))
        out = stubs[2].Decrypt(
            pb.DecryptRequest(
                ciphertext_blob=again.ciphertext_blob, min_commit_index=created.commit_index
            )
        )
        assert out.plaintext == b"after restart"
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert PIN not in node.log.read_text()
    assert not list(tmp_path.rglob("root.key"))  # no file seal was made
