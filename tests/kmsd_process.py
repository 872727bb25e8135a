"""Real `kmsd` processes for end-to-end tests: start on a free loopback port, kill, restart.

The port is learnt from the line `kmsd dev` prints once it serves, so tests never
guess ports or sleep: they wait for that line with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from kms.v1 import kms_service_pb2_grpc

_SERVING = re.compile(r"serving on ((?:127\.0\.0\.1:\d+,?)+)")
START_TIMEOUT = 30.0


class KmsdProcess:
    """One `kmsd dev` process over a data directory that outlives it."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None, nodes: int = 1) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args or []
        self.nodes = nodes
        self.endpoints: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}.stderr.log"
        self._channel: grpc.Channel | None = None

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
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
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
