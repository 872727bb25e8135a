"""Data-plane benchmark: kmsd against a bare gRPC service doing the same AES-GCM work.

`python -m bench.data_plane` (or `make bench`) starts `kmsd dev --nodes 1` (fresh
temporary data directory) and `bench.bare_service` as separate processes on 127.0.0.1,
creates one key in kmsd, and then, for Encrypt (4096-byte plaintext), Decrypt (of a
blob made once per target) and GenerateDataKey (AES_256), all with the encryption
context {"purpose": "bench"}, drives the same closed-loop load against both
targets from this process (grpc.aio, one channel per target, N calls in flight).

Rounds are interleaved (kmsd, bare, kmsd, bare, ...) so that drift of the shared,
noisy machine hits both alike; each round warms up, then measures for a fixed
duration. Reported per operation and concurrency: median ops/s over the rounds,
median p50 and p99 latency, the ratio kmsd/bare of the median ops/s (the goal is
>= 0.85), and each server process's CPU time per call (from /proc) with its ratio
bare/kmsd, which other load on the machine disturbs far less than ops/s.
`--json PATH` also writes every round's figures.

Everything is bounded in time (a deadline per call and for the whole run), and
every process started is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from bench._process import ServerProcess

__all__ = ["OPERATIONS", "TARGETS", "main"]

OPERATIONS = ("Encrypt", "Decrypt", "GenerateDataKey")
TARGETS = ("kmsd", "bare")
GOAL = 0.85
PLAINTEXT_BYTES = 4096
CONTEXT = {"purpose": "bench"}
CALL_TIMEOUT = 30.0

Call = Callable[[], Awaitable[object]]


@dataclass
class RoundResult:
    """One measured round against one target."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float
    completed: int
    errors: int
    seconds: float
    #: CPU time (user + system) the server process spent per completed call, in µs.
    server_cpu_us: float = math.nan
    #: The same for this load-generator process: if it nears the server's figure, the
    #: client, not the server, may be what limits ops/s.
    client_cpu_us: float = math.nan


@dataclass
class Row:
    """All rounds of one operation at one concurrency, against both targets."""

    op: str
    concurrency: int
    rounds: dict[str, list[RoundResult]] = field(
        default_factory=lambda: {target: [] for target in TARGETS}
    )

    def median(self, target: str, attribute: str) -> float:
        return statistics.median(float(getattr(r, attribute)) for r in self.rounds[target])

    @property
    def ratio(self) -> float:
        bare = self.median("bare", "ops_per_s")
        return self.median("kmsd", "ops_per_s") / bare if bare else math.nan

    @property
    def cpu_ratio(self) -> float:
        """Server CPU per call, bare/kmsd: the throughput ratio if only the server's CPU
        limited it. Much steadier than `ratio` on a shared machine."""
        kmsd = self.median("kmsd", "server_cpu_us")
        return self.median("bare", "server_cpu_us") / kmsd if kmsd else math.nan

    @property
    def paired_ratios(self) -> list[float]:
        """kmsd/bare of each round with the bare round measured right after it."""
        return [
            k.ops_per_s / b.ops_per_s if b.ops_per_s else math.nan
            for k, b in zip(self.rounds["kmsd"], self.rounds["bare"], strict=True)
        ]

    @property
    def errors(self) -> int:
        return sum(r.errors for target in TARGETS for r in self.rounds[target])


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc): `kmsd dev --nodes 3` runs its nodes
    as child processes. Just [pid] where /proc is missing."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far; NaN if unknown."""
    total = 0.0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            return math.nan
        # Counting from the state (field 3 of stat): utime is field 14, stime field 15.
        total += int(fields[11]) + int(fields[12])
    return total / float(os.sysconf("SC_CLK_TCK"))


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1); NaN if empty."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def measure(
    call: Call,
    concurrency: int,
    warmup: float,
    duration: float,
    server_pids: list[int] | None = None,
) -> RoundResult:
    """Runs `concurrency` closed-loop callers for warmup + duration seconds.

    Throughput counts the calls that complete inside the measured window; latency
    covers the calls started inside it (those finishing late included), so that a
    slow tail is not cut off. Failed calls are counted, never timed. If `server_pids`
    are given, their CPU time over the window is sampled too: CPU per call is
    far less sensitive than ops/s to what else the shared machine runs.
    """
    start = time.perf_counter() + warmup
    end = start + duration
    latencies: list[float] = []
    completed = 0
    errors = 0

    async def caller() -> None:
        nonlocal completed, errors
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            try:
                await call()
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            t1 = time.perf_counter()
            if start <= t1 <= end:
                completed += 1
            if t0 >= start:
                latencies.append(t1 - t0)

    async def cpu_sampler() -> tuple[float, float]:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        server0, client0 = cpu_seconds(server_pids or []), time.process_time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return cpu_seconds(server_pids or []) - server0, time.process_time() - client0

    sampler = asyncio.ensure_future(cpu_sampler())
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    server_cpu, client_cpu = await sampler
    if not server_pids:
        server_cpu = math.nan
    latencies.sort()
    return RoundResult(
        ops_per_s=completed / duration,
        p50_ms=_percentile(latencies, 0.50) * 1e3,
        p99_ms=_percentile(latencies, 0.99) * 1e3,
        completed=completed,
        errors=errors,
        seconds=duration,
        server_cpu_us=server_cpu / completed * 1e6 if completed else math.nan,
        client_cpu_us=client_cpu / completed * 1e6 if completed else math.nan,
    )


def _calls(
    stub: pb_grpc.KeyManagementServiceAsyncStub, key_id: str, blob: bytes
) -> dict[str, Call]:
    """The three benchmarked calls against one target, requests built once."""
    encrypt = pb.EncryptRequest(
        key_id=key_id, plaintext=os.urandom(PLAINTEXT_BYTES), encryption_context=CONTEXT
    )
    decrypt = pb.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT)
    data_key = pb.GenerateDataKeyRequest(
        key_id=key_id, key_spec=res.DATA_KEY_SPEC_AES_256, encryption_context=CONTEXT
    )
    return {
        "Encrypt": lambda: stub.Encrypt(encrypt, timeout=CALL_TIMEOUT),
        "Decrypt": lambda: stub.Decrypt(decrypt, timeout=CALL_TIMEOUT),
        "GenerateDataKey": lambda: stub.GenerateDataKey(data_key, timeout=CALL_TIMEOUT),
    }


@dataclass
class Settings:
    """What one run measures."""

    operations: list[str]
    concurrency: list[int]
    rounds: int
    duration: float
    warmup: float
    #: `kmsd dev --nodes`: 1 measures one node's data plane; 3 a local Raft cluster
    #: (calls go to node 1; CPU is that of all its node processes).
    kmsd_nodes: int = 1


async def run_benchmark(
    endpoints: dict[str, str],
    settings: Settings,
    progress: Callable[[str], None],
    pids: dict[str, list[int]] | None = None,
) -> list[Row]:
    """Creates the key, prepares the calls, and measures every (op, concurrency) row."""
    channels = {target: grpc.aio.insecure_channel(endpoints[target]) for target in TARGETS}
    try:
        stubs = {t: pb_grpc.KeyManagementServiceStub(c) for t, c in channels.items()}
        created = await stubs["kmsd"].CreateKey(
            pb.CreateKeyRequest(description="bench.data_plane"), timeout=CALL_TIMEOUT
        )
        key_id = created.key_metadata.key_id
        calls: dict[str, dict[str, Call]] = {}
        for target, stub in stubs.items():
            # Each target decrypts a blob it made itself (the bare service ignores key_id).
            made = await stub.Encrypt(
                pb.EncryptRequest(
                    key_id=key_id,
                    plaintext=os.urandom(PLAINTEXT_BYTES),
                    encryption_context=CONTEXT,
                ),
                timeout=CALL_TIMEOUT,
            )
            calls[target] = _calls(stub, key_id, made.ciphertext_blob)
        rows = []
        for op in settings.operations:
            for concurrency in settings.concurrency:
                row = Row(op, concurrency)
                for index in range(settings.rounds):
                    for target in TARGETS:
                        result = await measure(
                            calls[target][op],
                            concurrency,
                            settings.warmup,
                            settings.duration,
                            (pids or {}).get(target),
                        )
                        row.rounds[target].append(result)
                        progress(
                            f"  {op:<15} c={concurrency:<3} round {index + 1}/{settings.rounds}"
                            f" {target:<4} {result.ops_per_s:8.0f} ops/s"
                            f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                            f"  CPU µs/call server {result.server_cpu_us:3.0f}"
                            f" client {result.client_cpu_us:3.0f}"
                            + (f"  errors {result.errors}" if result.errors else "")
                        )
                rows.append(row)
        return rows
    finally:
        for channel in channels.values():
            await channel.close()


_MEDIANS = ("ops_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")


def format_table(rows: list[Row]) -> str:
    """The result table (Markdown, so that it pastes into docs/performance.md)."""
    lines = [
        "| op | concurrency | kmsd ops/s | bare ops/s | ratio kmsd/bare"
        " | kmsd p50 / p99 ms | bare p50 / p99 ms | server CPU µs/call kmsd / bare"
        " | CPU ratio bare/kmsd |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        k = {a: row.median("kmsd", a) for a in _MEDIANS}
        b = {a: row.median("bare", a) for a in _MEDIANS}
        lines.append(
            f"| {row.op} | {row.concurrency} | {k['ops_per_s']:,.0f} | {b['ops_per_s']:,.0f}"
            f" | {row.ratio:.2f} | {k['p50_ms']:.2f} / {k['p99_ms']:.2f}"
            f" | {b['p50_ms']:.2f} / {b['p99_ms']:.2f}"
            f" | {k['server_cpu_us']:.0f} / {b['server_cpu_us']:.0f} | {row.cpu_ratio:.2f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "cryptography": version("cryptography"),
    }


def _report(rows: list[Row], settings: Settings, started: float) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "machine": machine(),
        "goal_ratio": GOAL,
        "wall_seconds": round(time.monotonic() - started, 1),
        "results": [
            {
                "op": row.op,
                "concurrency": row.concurrency,
                "ratio": row.ratio,
                "cpu_ratio": row.cpu_ratio,
                "paired_ratios": row.paired_ratios,
                "median": {t: {a: row.median(t, a) for a in _MEDIANS} for t in TARGETS},
                "rounds": {t: [asdict(r) for r in row.rounds[t]] for t in TARGETS},
            }
            for row in rows
        ],
    }


def _json_safe(value: Any) -> Any:
    """`value` with NaN (no figure: no call completed, or no /proc) as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _budget(settings: Settings) -> float:
    """Seconds the whole measurement may take before it is abandoned."""
    per_round = settings.warmup + settings.duration + 2 * CALL_TIMEOUT / 10
    rounds = len(settings.operations) * len(settings.concurrency) * settings.rounds * 2
    return 60.0 + 2 * rounds * per_round


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def servers(workdir: Path, kmsd_nodes: int = 1) -> Iterator[dict[str, ServerProcess]]:
    """kmsd (fresh data directory) and the bare service, stopped whatever happens."""
    started: dict[str, ServerProcess] = {}
    # Both plaintext on loopback: this measures the data plane, not TLS, whose cost any
    # gRPC service pays alike (`kmsd dev --plaintext`: every caller is the administrator).
    argv = {
        "kmsd": [
            sys.executable, "-m", "kmsd", "dev", "--data-dir", str(workdir / "kmsd-data"),
            "--port", "0", "--nodes", str(kmsd_nodes), "--plaintext",
        ],
        "bare": [sys.executable, "-m", "bench.bare_service", "--port", "0"],
    }  # fmt: skip
    try:
        for target in TARGETS:
            process = ServerProcess(target, argv[target], workdir / f"{target}.stderr.log")
            started[target] = process
            # A dev cluster is ready once every node agrees on a leader (up to 60 s).
            process.start(timeout=90.0)
        yield started
    finally:
        for process in started.values():
            process.stop()


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_plane",
        description="kmsd against a bare gRPC service doing the same AES-GCM work.",
    )
    parser.add_argument("--duration", type=float, help="measured seconds per round (5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each round (1)")
    parser.add_argument("--rounds", type=int, help="rounds per target, interleaved (3)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 1], help="calls in flight (64 1)"
    )
    parser.add_argument(
        "--ops", nargs="+", choices=OPERATIONS, default=list(OPERATIONS), help="operations"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: 1 round of 1 s, 0.3 s warm-up"
    )
    parser.add_argument(
        "--kmsd-nodes",
        type=int,
        choices=(1, 3),
        default=1,
        help="kmsd dev --nodes: 1 (default) or a local 3-node cluster",
    )
    parser.add_argument("--json", type=Path, help="also write all figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    args = parser.parse_args(argv)
    defaults = (1.0, 0.3, 1) if args.quick else (5.0, 1.0, 3)
    settings = Settings(
        operations=args.ops,
        concurrency=args.concurrency,
        duration=args.duration if args.duration is not None else defaults[0],
        warmup=args.warmup if args.warmup is not None else defaults[1],
        rounds=args.rounds if args.rounds is not None else defaults[2],
        kmsd_nodes=args.kmsd_nodes,
    )
    if settings.duration <= 0 or settings.warmup < 0 or settings.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --rounds >= 1")
    if any(c < 1 for c in settings.concurrency):
        parser.error("--concurrency values must be >= 1")
    return settings, args.json, args.quiet


def main(argv: list[str] | None = None) -> int:
    settings, json_path, quiet = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    started = time.monotonic()

    def progress(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="kmsd-bench-") as tmp,
        servers(Path(tmp), settings.kmsd_nodes) as procs,
    ):
        endpoints = {target: procs[target].endpoint for target in TARGETS}
        pids = {target: process_tree(procs[target].pid) for target in TARGETS}
        progress(
            "servers: "
            + ", ".join(f"{t} {endpoints[t]} (pids {pids[t]})" for t in TARGETS)
            + f"; {settings.rounds} round(s) of {settings.duration:g} s"
            f" after {settings.warmup:g} s warm-up, concurrency {settings.concurrency}"
        )
        try:
            rows = asyncio.run(
                asyncio.wait_for(
                    run_benchmark(endpoints, settings, progress, pids),
                    timeout=_budget(settings),
                )
            )
        except TimeoutError:
            print("bench: the run exceeded its time budget; stopped", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as error:
            logs = ", ".join(str(p.log_path) for p in procs.values())
            print(f"bench: setup call failed: {error.code()} {error.details()}", file=sys.stderr)
            print(f"bench: server logs: {logs}", file=sys.stderr)
            return 1

    info = machine()
    print(
        f"kms data plane: kmsd (dev --nodes {settings.kmsd_nodes}) vs bare grpc.aio service,"
        f" {PLAINTEXT_BYTES}-byte plaintext,"
        f" context {CONTEXT}; median of {settings.rounds} round(s) of {settings.duration:g} s"
        f" (warm-up {settings.warmup:g} s)"
    )
    print(
        f"machine: {info['nproc']} CPUs, Python {info['python']}, grpcio {info['grpcio']},"
        f" protobuf {info['protobuf']}, cryptography {info['cryptography']}"
    )
    print()
    print(format_table(rows))
    print()
    for row in rows:
        verdict = "meets" if row.ratio >= GOAL else "BELOW"
        paired = ", ".join(f"{r:.2f}" for r in row.paired_ratios)
        print(
            f"ratio {row.op} c={row.concurrency}: {row.ratio:.3f} ({verdict} goal {GOAL});"
            f" per round: {paired}; server CPU ratio {row.cpu_ratio:.2f}"
        )
    errors = sum(row.errors for row in rows)
    if json_path is not None:
        report = _json_safe(_report(rows, settings, started))
        json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if errors:
        print(f"bench: {errors} call(s) failed; the figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        # The servers were already stopped on the way out of main().
        print("bench: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
