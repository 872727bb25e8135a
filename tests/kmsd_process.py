"""Real `kmsd` processes for end-to-end tests: start on a free loopback port, kill, restart.

The port is learnt from the line `kmsd dev` prints once it serves, so tests never
guess ports or sleep: they wait for that line with a deadline.

`kmsd dev` serves mutual TLS on certificates it makes in `<data-dir>/tls/`; the
helpers here (`channel()`, `stub()`, `client()`, `kmsctl_env()`) connect as its
`admin` client certificate, the dev cluster's administrator. `plaintext=True`
starts `kmsd dev --plaintext` instead (loopback, no authentication).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from kms.v1 import kms_service_pb2_grpc

from kms_client import KmsClient, TlsFiles
from kms_client.tls import open_channel
from kmsd.auth.certs import DevPki, ca_files, client_files, node_files, user_principal
from kmsd.dev_cluster import DEV_CLUSTER_ID

_SERVING = re.compile(r"serving on ((?:127\.0\.0\.1:\d+,?)+)")
START_TIMEOUT = 30.0
ADMIN_PRINCIPAL = user_principal(DEV_CLUSTER_ID, "admin")


def pki_of(tls_dir: Path, nodes: int) -> DevPki:
    """The `DevPki` of a dev cluster's `tls/` directory (made by `kmsd dev`, or by
    `kmsd.auth.certs.ensure_dev_pki`)."""
    return DevPki(
        directory=tls_dir,
        cluster_id=DEV_CLUSTER_ID,
        ca=ca_files(tls_dir),
        nodes={i: node_files(tls_dir, i) for i in range(1, nodes + 1)},
        admin=client_files(tls_dir, "admin"),
        admin_principal=ADMIN_PRINCIPAL,
    )


def tls_files(pki: DevPki) -> TlsFiles:
    """The admin's files, for KmsClient / ClusterClient."""
    return TlsFiles(pki.ca.cert, pki.admin.cert, pki.admin.key)


def secure_channel(
    endpoint: str, pki: DevPki | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A channel to `endpoint` as the admin (`pki` None: plaintext)."""
    return open_channel(endpoint, None if pki is None else tls_files(pki).credentials(), options)


def kmsctl_env(pki: DevPki | None) -> dict[str, str]:
    """The environment variables that point kmsctl at the admin's files."""
    if pki is None:
        return {"KMSD_NO_TLS": "1"}
    return {
        "KMSD_CA": str(pki.ca.cert),
        "KMSD_CERT": str(pki.admin.cert),
        "KMSD_KEY": str(pki.admin.key),
    }


class KmsdProcess:
    """One `kmsd dev` process over a data directory that outlives it."""

    def __init__(
        self,
        data_dir: Path,
        extra_args: list[str] | None = None,
        nodes: int = 1,
        *,
        plaintext: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args or []
        self.nodes = nodes
        self.plaintext = plaintext
        self.endpoints: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}.stderr.log"
        self._channel: grpc.Channel | None = None

    # -- TLS -------------------------------------------------------------------------

    @property
    def tls_dir(self) -> Path:
        """Where `kmsd dev` keeps its CA and certificates."""
        return self.data_dir.resolve() / "tls"

    @property
    def pki(self) -> DevPki | None:
        """The dev cluster's certificates; None in plaintext mode."""
        return None if self.plaintext else pki_of(self.tls_dir, self.nodes)

    @property
    def ca_path(self) -> Path:
        return ca_files(self.tls_dir).cert

    @property
    def cert_path(self) -> Path:
        """The admin client certificate."""
        return client_files(self.tls_dir, "admin").cert

    @property
    def key_path(self) -> Path:
        """The admin client private key."""
        return client_files(self.tls_dir, "admin").key

    def tls_files(self) -> TlsFiles:
        return TlsFiles(self.ca_path, self.cert_path, self.key_path)

    def credentials(self) -> grpc.ChannelCredentials:
        """The admin's channel credentials."""
        return self.tls_files().credentials()

    def channel(
        self, endpoint: str | None = None, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        """A new channel (the caller closes it) to `endpoint` (default: node 1), as admin."""
        return secure_channel(endpoint or self.endpoint, self.pki, options)

    def client(self, **kwargs: Any) -> KmsClient:
        """A KmsClient of every node, as admin (the caller closes it)."""
        if self.plaintext:
            kwargs.setdefault("plaintext", True)
        else:
            kwargs.setdefault("tls", self.tls_files())
        return KmsClient(self.endpoints, **kwargs)

    def kmsctl_env(self) -> dict[str, str]:
        """KMSD_ENDPOINT and the TLS variables: `kmsctl` as admin of this cluster."""
        return {"KMSD_ENDPOINT": ",".join(self.endpoints), **kmsctl_env(self.pki)}

    # -- process ---------------------------------------------------------------------

    def start(self, port: int = 0) -> KmsdProcess:
        stderr = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kmsd",
                "dev",
                "--nodes",
                str(self.nodes),
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(port or self.port),
                *(["--plaintext"] if self.plaintext else []),
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stderr.close()
        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            match = _SERVING.search(line)
            if match:
                self.endpoints = match.group(1).split(",")
                self.endpoint = self.endpoints[0]
                self.port = int(self.endpoint.rpartition(":")[2])
                return self
        self.stop()
        raise RuntimeError(f"kmsd did not start; see {self.log_path}:\n{self.log_path.read_text()}")

    def stub(self) -> kms_service_pb2_grpc.KeyManagementServiceStub:
        """A stub of node 1 on a channel this object keeps (closed by stop/kill)."""
        if self._channel is None:
            self._channel = self.channel()
        return kms_service_pb2_grpc.KeyManagementServiceStub(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self._close_channel()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self._reap()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        self._close_channel()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        self._reap()
        return code

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> KmsdProcess:
        """Starts again on the same port and data directory."""
        return self.start(self.port)
