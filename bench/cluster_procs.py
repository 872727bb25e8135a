"""Child processes of the cluster benchmark: start, SIGKILL, stop for sure, CPU time.

Every child is started from the main thread in its own session (so a Ctrl-C in the
terminal reaches only the benchmark, which then stops the children in order), with
PR_SET_PDEATHSIG on Linux so that it gets SIGTERM even if the benchmark itself is
SIGKILLed. `Children` keeps them all; `Children.stop_all()` runs on exit, error,
Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench._process import REPO_ROOT, server_env
from kmsd.dev_cluster import free_ports

__all__ = ["REPO_ROOT", "Child", "Children", "cpu_seconds", "free_ports"]

_PR_SET_PDEATHSIG = 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far; NaN if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    # After the command name: utime is field 14 and stime field 15 of the whole line.
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def _death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the benchmark dies."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


class Child:
    """One server process; its output goes to `log_path`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        source: Path = REPO_ROOT,
    ) -> None:
        """`source`: the source tree it runs from (its working directory, first on
        PYTHONPATH): this repository unless an A/B compares trees."""
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.source = source
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Child:
        env = server_env(self.source, self.env)
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.source,
                env=env,
                start_new_session=True,
                preexec_fn=_death_signal(),  # only ever called from the main thread
            )
        return self

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status (None if none)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Children:
    """Every child the benchmark started, stopped together (SIGTERM all, then wait)."""

    def __init__(self) -> None:
        self.all: list[Child] = []

    def add(self, child: Child) -> Child:
        self.all.append(child)
        return child

    def stop_all(self) -> None:
        for child in self.all:
            if child.running and child.proc is not None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.all:
            child.stop()
