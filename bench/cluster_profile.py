"""py-spy profiles of kmsd nodes for `bench.cluster --profile DIR`.

`record` samples one process (all its threads, idle ones left out, without pausing it)
into a collapsed-stack file; `summarize` turns such a file into the functions with the
largest inclusive ("in it or below") and self ("on top of the stack") share of samples.
py-spy comes from PyPI (`pip install py-spy`); it needs ptrace rights (root, or
CAP_SYS_PTRACE).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["record", "summarize"]


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return found


def record(pid: int, output: Path, seconds: float, rate: int = 250) -> subprocess.Popen[bytes]:
    """Starts py-spy on `pid` for `seconds`; the caller waits for the returned process.

    `--gil` keeps only samples of the thread holding the GIL: in a Python process that is
    where its CPU goes (native code run from Python is charged to the calling frame,
    e.g. gRPC's Cython callbacks to `Handle._run`), and the GIL is what caps a node.
    """
    argv = [
        _py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", "raw", "--nonblocking", "--gil",
        "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: Components, by the frame closest to the top of the stack that lies in kmsd.
_COMPONENTS = (
    ("kmsd/storage/", "WAL (append, framing, fdatasync)"),
    ("kmsd/log/raft_disk", "WAL (append, framing, fdatasync)"),
    ("kmsd/transport/", "peer transport (Raft messages over gRPC)"),
    ("kmsd/raft/", "Raft core"),
    ("kmsd/log/", "Raft driver (Ready loop, apply)"),
    ("kmsd/", "request handling (api, service, fsm, crypto)"),
)
_GENERIC = (
    "<module> (",
    "main (kmsd/cli.py)",
    "main (kmsd/launch.py)",
    "_run_code (",
    "_run_module_as_main (",
)


def _short(frame: str) -> str:
    """'handle (kmsd/log/raft_log.py)': the function and a short file, no line number."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match.group("file")
    if "/kmsd/" in path:
        # Wherever the source tree is (a clone, a worktree): from its package on.
        path = "kmsd/" + path.rpartition("/kmsd/")[2]
    else:
        for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3"):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
    return f"{match.group('func')} ({path})"


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for marker, name in _COMPONENTS:
            if marker in frame and not frame.startswith(_GENERIC):
                return name
    if frames and frames[-1].startswith("Handle._run ("):
        return "native code run by the event loop (gRPC aio Cython: RPC set-up, I/O)"
    return "asyncio, threads and other Python"


def summarize(path: Path, top: int = 12) -> str:
    """Shares of the samples in `path`: per component, per kmsd/gRPC function
    (inclusive: in it or below) and per frame on top of the stack (self)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        return f"  (no profile: {error})"
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        components[_component(frames)] += count
        for frame in set(frames):
            if ("kmsd/" in frame or "grpc/" in frame) and not frame.startswith(_GENERIC):
                inclusive[frame] += count
    if not total:
        return "  (no samples)"

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f} %"

    out = [f"  {total} samples with the GIL held; by component:"]
    out += [f"    {share(n)}  {name}" for name, n in components.most_common()]
    out.append("  kmsd and gRPC functions, inclusive:")
    out += [f"    {share(n)}  {f}" for f, n in inclusive.most_common(top)]
    out.append("  on top of the stack (self):")
    out += [f"    {share(n)}  {f}" for f, n in own.most_common(top // 2)]
    return "\n".join(out)
