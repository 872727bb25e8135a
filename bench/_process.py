"""Server processes for the benchmark: start one, wait (with a deadline) for its ready line,
stop it for sure.

Both `kmsd dev` and `bench.bare_service` print a line containing
`serving on 127.0.0.1:<port>` once they serve; the port is learnt from that line, so
the benchmark never guesses ports or sleeps. Reading uses select() so that a server
that hangs before its ready line cannot hang the benchmark; after it, a daemon
thread drains stdout so that a chatty server can never block on a full pipe.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from kmsd.launch import prefer_grpc_settings

__all__ = ["REPO_ROOT", "ServerProcess", "ServerStartError", "server_env"]

READY = re.compile(rb"serving on (127\.0\.0\.1):(\d+)")
REPO_ROOT = Path(__file__).resolve().parents[1]


def server_env(source: Path = REPO_ROOT, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process the benchmarks start from `source`: `base`
    (this process's by default), unbuffered output, `source` first on PYTHONPATH, and
    kmsd's own gRPC settings (`kmsd.launch`), so that kmsd and its stand-ins (the bare
    service, the echo servers) are the same gRPC stack; etcd ignores them."""
    env = {
        **(base if base is not None else os.environ),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    prefer_grpc_settings(env)
    return env


class ServerStartError(RuntimeError):
    """A server process exited, or printed no ready line before its deadline."""


class ServerProcess:
    """One server child process, identified by `name` in messages."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0
        self.ready_line = ""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Starts the process and returns once it has printed its ready line."""
        with self.log_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO_ROOT, env=server_env()
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buffer = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerStartError(f"{self.name}: no ready line after {timeout:.0f} s")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ServerStartError(
                    f"{self.name} exited before serving; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-4000:]
                )
            buffer += chunk
            match = READY.search(buffer)
            if match:
                self.host = match.group(1).decode()
                self.port = int(match.group(2))
                line_end = buffer.find(b"\n", match.end())
                self.ready_line = buffer[: line_end if line_end >= 0 else None].decode().strip()
                threading.Thread(target=self._drain, args=(fd,), daemon=True).start()
                return

    @staticmethod
    def _drain(fd: int) -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status (None if none)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(timeout=timeout)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
