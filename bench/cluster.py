"""Cluster benchmark: replicated writes of kmsd against etcd, leader failover, disk floor.

`python -m bench.cluster` (or `make bench-cluster`) measures, in one run:

1. the disk floor: 4 KiB append + fdatasync in a loop, in the filesystem that holds
   both clusters' data directories (p50 / p99);
2. replicated writes: a 3-node kmsd cluster (CreateKey, a short description and a
   fresh request_id per call, as the Python client sends) against a 3-node etcd
   cluster (Debian's etcd-server, installed with apt-get if missing; KV.Put of a
   fresh key with a 256-byte value), both on 127.0.0.1 with their default fsync and
   Raft timing, driven by the same closed-loop load generator (grpc.aio, one channel
   per endpoint, N callers in flight) at each concurrency. Rounds are interleaved
   (kmsd, etcd, kmsd, etcd, ...) and medians reported, with the ratio kmsd/etcd of
   the median ops/s (goal >= 0.5), and each cluster's server CPU per write (the sum
   over its three processes, from /proc) which the shared machine disturbs less;
3. failover: on a fresh kmsd cluster, 16 writer threads (one `KmsClient` with its
   default retries) and steady Encrypt+Decrypt callers (one per surviving node,
   directly, without retries, plus one through a `KmsClient`); the leader is
   SIGKILLed; reported per trial: the time from the kill to the first successful
   write whose last attempt started after the kill, the time until a survivor
   reports itself leader, and the failed calls (after the client's retries) of each
   kind. The killed node is restarted and caught up between trials.

`--single-node` adds a third target, interleaved with the two clusters: one kmsd node
without replication (no `[[cluster.members]]`: its single-node log), the same calls:
the most a kmsd cluster could do if replication cost nothing.

`--echo-ceiling` adds two more, interleaved the same way: `bench.cluster_echo`, a bare
grpc.aio server in its own process (kmsd's server options) answering CreateKey with a
fixed empty response and doing nothing else, and the same on gRPC's threaded server
(`--threads 4`), driven by the same load generator and calls: what kmsd's server stack,
and the other Python gRPC server, answer on this machine doing nothing. Its table
gives their calls/s, latency and server CPU per call, and each target's ops/s over
the echo's (etcd/echo, kmsd 3 nodes/echo, and kmsd 1 node/echo with `--single-node`)
and over the threaded echo's.

Calls go to the leader's endpoint by default (`--via leader`, what a leader-aware
client does; etcd's clients also send to one member); `--via all` spreads the
callers over the three endpoints, so that followers forward (kmsd) or proxy (etcd).

Everything is bounded in time (a deadline per call, per wait, and an alarm for the
whole run); only 127.0.0.1 is used; every process started is stopped on exit,
error, Ctrl-C or SIGTERM (and gets SIGTERM from Linux should this process die).
`--profile DIR` records each kmsd node with py-spy during the first kmsd round at
each concurrency and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from bench.cluster_echo import EchoServer
from bench.cluster_etcd import EtcdCluster, EtcdUnavailable, ensure_etcd, etcd_stubs
from bench.cluster_kmsd import KmsdCluster
from bench.cluster_procs import Children, cpu_seconds
from bench.data_plane import _percentile, _raise_system_exit
from kms_client import KmsClient, KmsClientError

__all__ = ["GOAL_FAILOVER_S", "GOAL_RATIO", "main"]

TARGETS = ("kmsd", "etcd")
#: With --single-node: one kmsd node on its single-node log (no Raft), the same calls.
SINGLE = "kmsd-1"
#: With --echo-ceiling: a grpc.aio server answering CreateKey with no work at all,
#: and the same on gRPC's threaded server (ECHO_THREADS workers).
ECHO = "echo"
THREADED_ECHO = "echo-threads"
ECHO_THREADS = 4
GOAL_RATIO = 0.5
GOAL_FAILOVER_S = 2.0
ETCD_VALUE_BYTES = 256
KMSD_DESCRIPTION = "bench.cluster"
CALL_TIMEOUT = 10.0
CRYPTO_PLAINTEXT = os.urandom(256)
CRYPTO_CONTEXT = {"purpose": "bench.cluster"}

Call = Callable[[], Awaitable[object]]


# ---------------------------------------------------------------------------- disk floor


@dataclass
class DiskFloor:
    directory: str
    filesystem: str
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


def _filesystem(path: Path) -> str:
    """'ext4 on /dev/vda' for the mount holding `path` (Linux /proc/mounts), else '?'."""
    best, answer = "", "?"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return answer
    real = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, answer = mount, f"{parts[2]} on {parts[0]}"
    return answer


def disk_floor(directory: Path, seconds: float, max_samples: int = 20_000) -> DiskFloor:
    """4 KiB appended and fdatasync'ed in a loop, as a WAL does: the per-write floor."""
    path = directory / "fsync-probe"
    block = os.urandom(4096)
    latencies: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and len(latencies) < max_samples:
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    latencies.sort()
    return DiskFloor(
        directory=str(directory),
        filesystem=_filesystem(directory),
        samples=len(latencies),
        p50_ms=_percentile(latencies, 0.50) * 1e3,
        p99_ms=_percentile(latencies, 0.99) * 1e3,
        mean_ms=statistics.fmean(latencies) * 1e3 if latencies else math.nan,
    )


# ---------------------------------------------------------------------------- throughput


@dataclass
class RoundResult:
    """One measured round against one cluster."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float
    completed: int
    errors: int
    seconds: float
    #: CPU (user + system) of the measured cluster's three processes per write, µs.
    server_cpu_us: float = math.nan
    #: CPU of this process (the load generator) per write, µs.
    client_cpu_us: float = math.nan
    #: CPU the other, idle cluster(s) used meanwhile, in % of one core.
    idle_other_cpu_pct: float = math.nan
    #: CPU used by processes other than the bench and both clusters (the machine is
    #: shared), in % of one core: a round with much of it is disturbed.
    foreign_cpu_pct: float = math.nan
    error_codes: dict[str, int] = field(default_factory=dict)


@dataclass
class Row:
    """All rounds at one concurrency, against both clusters."""

    concurrency: int
    rounds: dict[str, list[RoundResult]] = field(
        default_factory=lambda: {target: [] for target in TARGETS}
    )

    def median(self, target: str, attribute: str) -> float:
        return statistics.median(float(getattr(r, attribute)) for r in self.rounds[target])

    def ops_ratio(self, target: str, versus: str) -> float:
        """Median ops/s of `target` over those of `versus` (NaN if `versus` did none)."""
        other = self.median(versus, "ops_per_s")
        return self.median(target, "ops_per_s") / other if other else math.nan

    @property
    def ratio(self) -> float:
        return self.ops_ratio("kmsd", "etcd")

    @property
    def cpu_ratio(self) -> float:
        """Server CPU per write etcd/kmsd: the ratio if only server CPU limited both."""
        kmsd = self.median("kmsd", "server_cpu_us")
        return self.median("etcd", "server_cpu_us") / kmsd if kmsd else math.nan

    @property
    def paired_ratios(self) -> list[float]:
        return [
            k.ops_per_s / e.ops_per_s if e.ops_per_s else math.nan
            for k, e in zip(self.rounds["kmsd"], self.rounds["etcd"], strict=True)
        ]

    @property
    def errors(self) -> int:
        return sum(r.errors for rounds in self.rounds.values() for r in rounds)

    def single_ratio(self) -> float:
        """Writes/s of one unreplicated kmsd node over etcd's puts/s (--single-node)."""
        return self.ops_ratio(SINGLE, "etcd")

    def echo_ratios(self, echo: str = ECHO) -> dict[str, float]:
        """Each other target's ops/s over an echo server's calls/s (--echo-ceiling)."""
        return {
            target: self.ops_ratio(target, echo)
            for target in self.rounds
            if target not in (ECHO, THREADED_ECHO)
        }


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _machine_busy_seconds() -> float:
    """CPU seconds all processors spent busy since boot (Linux /proc/stat); NaN elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return math.nan
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    ticks = [int(f) for f in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / float(os.sysconf("SC_CLK_TCK"))


async def measure(
    call: Call,
    concurrency: int,
    warmup: float,
    duration: float,
    server_pids: list[int],
    other_pids: list[int],
) -> RoundResult:
    """`concurrency` closed-loop callers for warmup + duration seconds.

    Throughput counts the calls completing inside the measured window; latency covers
    the calls started inside it (those finishing after it included, so a slow tail is
    not cut off). Failed calls are counted, never timed. CPU of both clusters and of
    this process is sampled at the window's edges.
    """
    start = time.perf_counter() + warmup
    end = start + duration
    latencies: list[float] = []
    completed = 0
    codes: Counter[str] = Counter()

    async def caller() -> None:
        nonlocal completed
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
                continue
            t1 = time.perf_counter()
            if start <= t1 <= end:
                completed += 1
            if t0 >= start:
                latencies.append(t1 - t0)

    async def cpu_sampler() -> tuple[float, ...]:
        def sample() -> tuple[float, ...]:
            return (
                _cpu(server_pids),
                time.process_time(),
                _cpu(other_pids),
                _machine_busy_seconds(),
            )

        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        before = sample()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return tuple(b - a for a, b in zip(before, sample(), strict=True))

    sampler = asyncio.ensure_future(cpu_sampler())
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    server_cpu, client_cpu, other_cpu, machine_cpu = await sampler
    latencies.sort()
    per_call = 1e6 / completed if completed else math.nan
    return RoundResult(
        ops_per_s=completed / duration,
        p50_ms=_percentile(latencies, 0.50) * 1e3,
        p99_ms=_percentile(latencies, 0.99) * 1e3,
        completed=completed,
        errors=sum(codes.values()),
        seconds=duration,
        server_cpu_us=server_cpu * per_call,
        client_cpu_us=client_cpu * per_call,
        idle_other_cpu_pct=other_cpu / duration * 100,
        foreign_cpu_pct=max(0.0, machine_cpu - server_cpu - client_cpu - other_cpu)
        / duration
        * 100,
        error_codes=dict(codes),
    )


def kmsd_call(stubs: list[pb_grpc.KeyManagementServiceAsyncStub]) -> Call:
    """CreateKey with a short description and a fresh request_id, round-robin."""
    turn = itertools.cycle(stubs)

    def call() -> Awaitable[object]:
        request = pb.CreateKeyRequest(description=KMSD_DESCRIPTION, request_id=str(uuid.uuid4()))
        return next(turn).CreateKey(request, timeout=CALL_TIMEOUT)

    return call


def etcd_call(etcd_pb: ModuleType, stubs: list[Any]) -> Call:
    """KV.Put of a fresh key with a 256-byte value, round-robin."""
    turn = itertools.cycle(stubs)
    value = os.urandom(ETCD_VALUE_BYTES)
    counter = itertools.count()

    def call() -> Awaitable[object]:
        request = etcd_pb.PutRequest(key=b"bench/%d" % next(counter), value=value)
        return next(turn).Put(request, timeout=CALL_TIMEOUT)  # type: ignore[no-any-return]

    return call


@dataclass
class Settings:
    """What one run measures."""

    concurrency: list[int]
    rounds: int
    duration: float
    warmup: float
    via: str
    trials: int
    writers: int
    fsync_seconds: float
    #: KmsClient max_attempts in the failover trials (None: the client's default).
    client_attempts: int | None = None
    throughput: bool = True
    failover: bool = True
    #: Also measure one unreplicated kmsd node, interleaved with the two clusters.
    single_node: bool = False
    #: Also measure servers answering CreateKey with no work (grpc.aio and threaded).
    echo_ceiling: bool = False

    @property
    def targets(self) -> int:
        """How many targets each round measures."""
        return len(TARGETS) + self.single_node + 2 * self.echo_ceiling


class Profiler:
    """py-spy on every kmsd node during one round (only with --profile)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.done: set[int] = set()
        self.summaries: dict[str, str] = {}

    async def around(
        self, concurrency: int, pids: dict[int, int], seconds: float, measured: Awaitable[Any]
    ) -> Any:
        if self.directory is None or concurrency in self.done:
            return await measured
        from bench.cluster_profile import record, summarize

        self.done.add(concurrency)
        outputs = {node: self.directory / f"kmsd-node{node}-c{concurrency}.txt" for node in pids}
        procs = [record(pid, outputs[node], seconds) for node, pid in pids.items()]
        try:
            return await measured
        finally:
            for proc in procs:
                await asyncio.to_thread(proc.wait, 60)
            for node, path in outputs.items():
                self.summaries[f"node {node} c={concurrency}"] = summarize(path)


class Served(Protocol):
    """Server processes answering kmsd's CreateKey: a `KmsdCluster` or an `EchoServer`."""

    @property
    def endpoints(self) -> list[str]: ...

    @property
    def pids(self) -> list[int]: ...


async def run_throughput(
    kmsd: KmsdCluster,
    etcd: EtcdCluster,
    etcd_pb: ModuleType,
    etcd_grpc: ModuleType,
    settings: Settings,
    progress: Callable[[str], None],
    profiler: Profiler,
    ceilings: Mapping[str, Served] | None = None,
) -> list[Row]:
    """Interleaved rounds at each concurrency; returns a Row per concurrency.

    `ceilings` are more targets answering the same CreateKey calls on all their
    endpoints (SINGLE, ECHO, THREADED_ECHO), measured after the two clusters in each round.
    """
    leader = kmsd.leader()
    etcd_leader = etcd.leader_endpoint(time.monotonic() + 30)
    endpoints = {
        "kmsd": [kmsd.endpoint(leader)] if settings.via == "leader" else kmsd.endpoints,
        "etcd": [etcd_leader] if settings.via == "leader" else etcd.endpoints,
    }
    pids = {"kmsd": kmsd.pids, "etcd": etcd.pids}
    for name, served in (ceilings or {}).items():
        endpoints[name] = served.endpoints
        pids[name] = served.pids
    targets = list(endpoints)
    progress(f"throughput: kmsd leader node {leader}, etcd leader {etcd_leader}")
    channels = {t: [grpc.aio.insecure_channel(e) for e in endpoints[t]] for t in targets}
    try:
        calls = {
            t: kmsd_call([pb_grpc.KeyManagementServiceStub(c) for c in channels[t]])
            for t in targets
            if t != "etcd"
        }
        calls["etcd"] = etcd_call(etcd_pb, [etcd_grpc.KVStub(c) for c in channels["etcd"]])
        for target in targets:  # connect, and fail early if a cluster does not write
            await calls[target]()
        kmsd_pids = {node: child.pid for node, child in kmsd.nodes.items()}
        rows = []
        for concurrency in settings.concurrency:
            row = Row(concurrency)
            for target in targets:
                row.rounds.setdefault(target, [])
            for index in range(settings.rounds):
                for target in targets:
                    others = [t for t in targets if t != target]
                    other = "+".join(others)
                    measured = measure(
                        calls[target],
                        concurrency,
                        settings.warmup,
                        settings.duration,
                        pids[target],
                        [pid for t in others for pid in pids[t]],
                    )
                    if target == "kmsd":
                        result = await profiler.around(
                            concurrency, kmsd_pids, settings.warmup + settings.duration, measured
                        )
                    else:
                        result = await measured
                    row.rounds[target].append(result)
                    progress(
                        f"  c={concurrency:<3} round {index + 1}/{settings.rounds} {target:<6}"
                        f" {result.ops_per_s:7.0f} ops/s  p50 {result.p50_ms:6.2f} ms"
                        f"  p99 {result.p99_ms:6.2f} ms  server CPU"
                        f" {result.server_cpu_us:5.0f} µs/op  client CPU"
                        f" {result.client_cpu_us:4.0f} µs/op  idle {other}"
                        f" {result.idle_other_cpu_pct:3.0f} %  foreign"
                        f" {result.foreign_cpu_pct:3.0f} %"
                        + (f"  errors {result.error_codes}" if result.errors else "")
                    )
            rows.append(row)
        return rows
    finally:
        for target_channels in channels.values():
            for channel in target_channels:
                await channel.close()


_MEDIANS = ("ops_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us", "foreign_cpu_pct")


def format_table(rows: list[Row]) -> str:
    """The result table (Markdown, so that it pastes into docs/performance.md)."""
    lines = [
        "| clients | kmsd writes/s | etcd puts/s | ratio kmsd/etcd | kmsd p50 / p99 ms"
        " | etcd p50 / p99 ms | server CPU µs/write kmsd / etcd | CPU ratio etcd/kmsd"
        " | load-generator CPU µs/call kmsd / etcd | foreign CPU % kmsd / etcd rounds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        k = {a: row.median("kmsd", a) for a in _MEDIANS}
        e = {a: row.median("etcd", a) for a in _MEDIANS}
        lines.append(
            f"| {row.concurrency} | {k['ops_per_s']:,.0f} | {e['ops_per_s']:,.0f}"
            f" | {row.ratio:.2f} | {k['p50_ms']:.2f} / {k['p99_ms']:.2f}"
            f" | {e['p50_ms']:.2f} / {e['p99_ms']:.2f}"
            f" | {k['server_cpu_us']:,.0f} / {e['server_cpu_us']:,.0f} | {row.cpu_ratio:.2f}"
            f" | {k['client_cpu_us']:.0f} / {e['client_cpu_us']:.0f}"
            f" | {k['foreign_cpu_pct']:.0f} / {e['foreign_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


#: A column of a ceiling table: its header, and its cell for one Row.
Column = tuple[str, Callable[[Row], str]]


def _ops(target: str) -> Callable[[Row], str]:
    return lambda row: f"{row.median(target, 'ops_per_s'):,.0f}"


def _latency(target: str) -> Callable[[Row], str]:
    return lambda row: f"{row.median(target, 'p50_ms'):.2f} / {row.median(target, 'p99_ms'):.2f}"


def _cpu_per_call(target: str, attribute: str = "server_cpu_us") -> Callable[[Row], str]:
    return lambda row: f"{row.median(target, attribute):,.0f}"


def _ops_ratio(target: str, versus: str) -> Callable[[Row], str]:
    return lambda row: f"{row.ops_ratio(target, versus):.2f}"


def _ceiling_table(rows: list[Row], columns: list[Column]) -> str:
    """A Markdown table with one line per concurrency: "clients", then `columns`."""
    headers = ["clients", *(header for header, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + " ---: |" * len(headers)]
    for row in rows:
        cells = [str(row.concurrency), *(cell(row) for _, cell in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_single_table(rows: list[Row]) -> str:
    """The --single-node comparison: what one kmsd node does without replication."""
    return _ceiling_table(
        rows,
        [
            ("kmsd 1 node writes/s", _ops(SINGLE)),
            ("etcd puts/s", _ops("etcd")),
            ("ratio 1 node/etcd", _ops_ratio(SINGLE, "etcd")),
            ("kmsd 3 nodes / 1 node", _ops_ratio("kmsd", SINGLE)),
            ("1 node p50 / p99 ms", _latency(SINGLE)),
            ("server CPU µs/write 1 node", _cpu_per_call(SINGLE)),
        ],
    )


def format_echo_table(rows: list[Row]) -> str:
    """The --echo-ceiling comparison: what a server doing no work answers, and each
    target's ops/s over it."""
    columns = [
        ("echo calls/s", _ops(ECHO)),
        ("echo p50 / p99 ms", _latency(ECHO)),
        ("server CPU µs/call echo", _cpu_per_call(ECHO)),
        ("load-generator CPU µs/call echo", _cpu_per_call(ECHO, "client_cpu_us")),
        ("ratio etcd/echo", _ops_ratio("etcd", ECHO)),
        ("kmsd 3 nodes / echo", _ops_ratio("kmsd", ECHO)),
    ]
    if rows and SINGLE in rows[0].rounds:
        columns.append(("kmsd 1 node / echo", _ops_ratio(SINGLE, ECHO)))
    return _ceiling_table(rows, columns)


def format_threaded_echo_table(rows: list[Row]) -> str:
    """The same against the echo on gRPC's threaded server."""
    columns = [
        ("threaded echo calls/s", _ops(THREADED_ECHO)),
        ("threaded echo p50 / p99 ms", _latency(THREADED_ECHO)),
        ("server CPU µs/call threaded echo", _cpu_per_call(THREADED_ECHO)),
        ("threaded / aio echo", _ops_ratio(THREADED_ECHO, ECHO)),
        ("ratio etcd/threaded echo", _ops_ratio("etcd", THREADED_ECHO)),
        ("kmsd 3 nodes / threaded echo", _ops_ratio("kmsd", THREADED_ECHO)),
    ]
    if rows and SINGLE in rows[0].rounds:
        columns.append(("kmsd 1 node / threaded echo", _ops_ratio(SINGLE, THREADED_ECHO)))
    return _ceiling_table(rows, columns)


# ---------------------------------------------------------------------------- failover


@dataclass
class Trial:
    """One SIGKILL of the leader under load."""

    killed: int
    #: Kill -> completion of the first write whose last attempt started after the kill.
    resume_s: float
    #: Kill -> a surviving node reports itself leader (polled every 20 ms).
    election_s: float
    writes_ok: int
    writes_failed: int
    #: Attempts the client retried (each backoff sleep of the writers' KmsClient).
    write_retries: int
    crypto_direct_ok: int
    crypto_direct_failed: int
    crypto_client_ok: int
    crypto_client_failed: int
    crypto_client_retries: int
    #: Kill -> the first and the last failure of a direct crypto call (NaN: none failed).
    crypto_refused_from_s: float
    crypto_refused_until_s: float
    #: The slowest direct crypto call (failed or not): how long a survivor stalled one.
    crypto_direct_max_s: float
    #: Calls still running when the trial ended (bounded join); should be 0.
    stuck_calls: int
    #: CPU of other processes on the shared machine from the kill to the end, % of a core.
    foreign_cpu_pct: float
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)


class _Load:
    """Writer and crypto threads against a kmsd cluster, with shared counters."""

    def __init__(
        self,
        cluster: KmsdCluster,
        key_id: str,
        survivors: list[int],
        client_attempts: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.key_id = key_id
        self.survivors = survivors
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: The first message of each kind of error.
        self.examples: dict[str, str] = {}
        #: When each direct crypto call to a survivor failed, and the slowest one.
        self.crypto_direct_failures: list[float] = []
        self.crypto_direct_max_s = 0.0
        #: (start of the last attempt, completion) of each successful write.
        self.writes: list[tuple[float, float]] = []
        self.threads: list[threading.Thread] = []
        options: dict[str, Any] = {"plaintext": True}  # the nodes serve plaintext (loopback)
        if client_attempts is not None:
            options["max_attempts"] = client_attempts
        self.write_client = KmsClient(
            cluster.endpoints, sleep=self._sleep("write_retries"), **options
        )
        self.crypto_client = KmsClient(
            cluster.endpoints, sleep=self._sleep("crypto_retries"), **options
        )

    def _sleep(self, counter: str) -> Callable[[float], None]:
        def sleep(seconds: float) -> None:
            with self.lock:
                self.counts[counter] += 1
            time.sleep(seconds)
            self.local.attempt_start = time.monotonic()

        return sleep

    def _fail(self, counter: str, label: str, error: BaseException) -> None:
        """Counts a failed call under `counter`, and its status code under `label`."""
        code = getattr(error, "code", None)
        name = code().name if callable(code) else getattr(code, "name", type(error).__name__)
        with self.lock:
            self.counts[counter] += 1
            self.errors[f"{label} {name}"] += 1
            details = error.details() if isinstance(error, grpc.RpcError) else str(error)
            self.examples.setdefault(f"{label} {name}", str(details)[:200])

    def _writer(self) -> None:
        while not self.stop.is_set():
            self.local.attempt_start = time.monotonic()
            try:
                self.write_client.create_key(description="bench.cluster failover")
            except Exception as error:  # counted, whatever it is
                self._fail("writes_failed", "write", error)
                continue
            done = time.monotonic()
            with self.lock:
                self.counts["writes_ok"] += 1
                self.writes.append((self.local.attempt_start, done))

    def _direct(self, node_id: int, call: Callable[[], Any]) -> Any:
        """One crypto call straight to a node, no retries: counted, timed; None if failed."""
        t0 = time.monotonic()
        try:
            response = call()
        except grpc.RpcError as error:
            self._fail("crypto_direct_failed", f"crypto direct to node {node_id}", error)
            response = None
        done = time.monotonic()
        with self.lock:
            self.crypto_direct_max_s = max(self.crypto_direct_max_s, done - t0)
            if response is None:
                self.crypto_direct_failures.append(done)
            else:
                self.counts["crypto_direct_ok"] += 1
        return response

    def _crypto_direct(self, node_id: int) -> None:
        with grpc.insecure_channel(self.cluster.endpoint(node_id)) as channel:
            stub = pb_grpc.KeyManagementServiceStub(channel)
            encrypt = pb.EncryptRequest(
                key_id=self.key_id, plaintext=CRYPTO_PLAINTEXT, encryption_context=CRYPTO_CONTEXT
            )
            while not self.stop.is_set():
                encrypted = self._direct(
                    node_id, lambda: stub.Encrypt(encrypt, timeout=CALL_TIMEOUT)
                )
                if encrypted is not None:
                    decrypt = pb.DecryptRequest(
                        ciphertext_blob=encrypted.ciphertext_blob,
                        encryption_context=CRYPTO_CONTEXT,
                    )
                    self._direct(
                        node_id, functools.partial(stub.Decrypt, decrypt, timeout=CALL_TIMEOUT)
                    )

    def _crypto_client(self) -> None:
        while not self.stop.is_set():
            try:
                blob = self.crypto_client.encrypt(
                    self.key_id, CRYPTO_PLAINTEXT, CRYPTO_CONTEXT
                ).ciphertext_blob
                with self.lock:
                    self.counts["crypto_client_ok"] += 1
                self.crypto_client.decrypt(blob, CRYPTO_CONTEXT)
                with self.lock:
                    self.counts["crypto_client_ok"] += 1
            except Exception as error:  # counted, whatever it is
                self._fail("crypto_client_failed", "crypto via client", error)

    def start(self, writers: int) -> None:
        targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self._writer, ()) for _ in range(writers)
        ]
        targets += [(self._crypto_direct, (node,)) for node in self.survivors]
        targets.append((self._crypto_client, ()))
        for target, args in targets:
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self, timeout: float) -> int:
        """Stops the threads; returns how many were still in a call after `timeout`."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in self.threads)
        self.write_client.close()
        self.crypto_client.close()
        return stuck

    def resumed_at(self, kill_time: float) -> float:
        with self.lock:
            after = [done for attempt, done in self.writes if attempt >= kill_time]
        return min(after, default=math.inf)


def _watch_election(
    cluster: KmsdCluster, survivors: list[int], killed: int, stop: threading.Event
) -> list[float]:
    """Starts a thread that records when a survivor first reports itself leader."""
    from kms.v1 import cluster_service_pb2 as cluster_pb

    seen: list[float] = []

    def watch() -> None:
        while not stop.is_set() and not seen:
            for node in survivors:
                try:
                    status = cluster.status(node, timeout=0.5)
                except grpc.RpcError:
                    continue
                if status.role == cluster_pb.NODE_ROLE_LEADER and status.node_id != killed:
                    seen.append(time.monotonic())
                    return
            time.sleep(0.02)  # polling pace

    threading.Thread(target=watch, daemon=True).start()
    return seen


def run_trial(
    cluster: KmsdCluster,
    key_id: str,
    writers: int,
    settle: float = 1.0,
    after: float = 1.0,
    max_wait: float = 15.0,
    client_attempts: int | None = None,
) -> Trial:
    leader = cluster.leader()
    survivors = [node for node in cluster.nodes if node != leader]
    load = _Load(cluster, key_id, survivors, client_attempts)
    load.start(writers)
    time.sleep(settle)  # steady load before the kill
    with load.lock:
        before = load.counts["writes_ok"]
    if before == 0:
        load.finish(30)
        raise RuntimeError("no write succeeded before the kill; see the node logs")
    watch_stop = threading.Event()
    ours = [cluster.nodes[node].pid for node in survivors]
    cpu_before = _cpu(ours) + time.process_time(), _machine_busy_seconds()
    kill_time = time.monotonic()
    cluster.kill_node(leader)
    elected = _watch_election(cluster, survivors, leader, watch_stop)
    deadline = kill_time + max_wait
    while time.monotonic() < deadline and load.resumed_at(kill_time) == math.inf:
        time.sleep(0.01)  # polling pace
    resumed = load.resumed_at(kill_time)
    time.sleep(after)  # keep calling after the resumption: late failures count too
    stuck = load.finish(timeout=3 * CALL_TIMEOUT)
    watch_stop.set()
    cpu_after = _cpu(ours) + time.process_time(), _machine_busy_seconds()
    foreign = (cpu_after[1] - cpu_before[1]) - (cpu_after[0] - cpu_before[0])
    c = load.counts
    refused = load.crypto_direct_failures
    trial = Trial(
        killed=leader,
        resume_s=resumed - kill_time,
        election_s=(elected[0] - kill_time) if elected else math.inf,
        writes_ok=c["writes_ok"],
        writes_failed=c["writes_failed"],
        write_retries=c["write_retries"],
        crypto_direct_ok=c["crypto_direct_ok"],
        crypto_direct_failed=c["crypto_direct_failed"],
        crypto_client_ok=c["crypto_client_ok"],
        crypto_client_failed=c["crypto_client_failed"],
        crypto_client_retries=c["crypto_retries"],
        crypto_refused_from_s=min(refused) - kill_time if refused else math.nan,
        crypto_refused_until_s=max(refused) - kill_time if refused else math.nan,
        crypto_direct_max_s=load.crypto_direct_max_s,
        stuck_calls=stuck,
        foreign_cpu_pct=max(0.0, foreign) / (time.monotonic() - kill_time) * 100,
        errors=dict(load.errors),
        error_examples=dict(load.examples),
    )
    # Bring the killed node back on its data and let it catch up before the next trial.
    cluster.start_node(leader)
    cluster.wait_ready(time.monotonic() + 60)
    return trial


def run_failover(
    cluster: KmsdCluster, settings: Settings, progress: Callable[[str], None]
) -> list[Trial]:
    with KmsClient(cluster.endpoints, plaintext=True) as client:
        key_id = client.create_key(description="bench.cluster crypto").key_metadata.key_id
    trials = []
    for index in range(settings.trials):
        trial = run_trial(
            cluster, key_id, settings.writers, client_attempts=settings.client_attempts
        )
        trials.append(trial)
        progress(f"  failover {index + 1}/{settings.trials}: {trial_line(trial)}")
        for label, example in trial.error_examples.items():
            progress(f"    first {label}: {example}")
    return trials


def trial_line(t: Trial) -> str:
    refused = (
        f" (refused from +{t.crypto_refused_from_s:.2f} s to +{t.crypto_refused_until_s:.2f} s)"
        if t.crypto_direct_failed
        else ""
    )
    return (
        f"killed node {t.killed}; writes resumed after {t.resume_s:.3f} s"
        f" (leader after {t.election_s:.3f} s); failed calls: writes"
        f" {t.writes_failed}/{t.writes_ok + t.writes_failed} ({t.write_retries} retried"
        f" attempts), crypto direct {t.crypto_direct_failed}/"
        f"{t.crypto_direct_ok + t.crypto_direct_failed}{refused}, slowest"
        f" {t.crypto_direct_max_s:.2f} s; crypto via client"
        f" {t.crypto_client_failed}/{t.crypto_client_ok + t.crypto_client_failed}"
        f" ({t.crypto_client_retries} retried attempts); foreign CPU {t.foreign_cpu_pct:.0f} %"
        + (f"; stuck {t.stuck_calls}" if t.stuck_calls else "")
        + (f"; errors {t.errors}" if t.errors else "")
    )


def failover_line(trials: list[Trial]) -> str:
    resume = [t.resume_s for t in trials]
    election = [t.election_s for t in trials]
    writes_failed = sum(t.writes_failed for t in trials)
    crypto_failed = sum(t.crypto_direct_failed + t.crypto_client_failed for t in trials)
    ok_time = max(resume) <= GOAL_FAILOVER_S
    return (
        f"failover: {len(trials)} trial(s), SIGKILL of the leader -> first successful write:"
        f" median {statistics.median(resume):.3f} s, max {max(resume):.3f} s"
        f" ({'meets' if ok_time else 'MISSES'} goal {GOAL_FAILOVER_S:g} s);"
        f" new leader after median {statistics.median(election):.3f} s;"
        f" failed client calls: writes {writes_failed}"
        f" (retried attempts {sum(t.write_retries for t in trials)}),"
        f" crypto direct to survivors {sum(t.crypto_direct_failed for t in trials)},"
        f" crypto via client {sum(t.crypto_client_failed for t in trials)}"
        f" ({'meets' if crypto_failed == 0 else 'MISSES'} goal 0 crypto failures)"
    )


# ---------------------------------------------------------------------------- run


def machine(etcd_version: str) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "commit": commit or "?",
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "etcd": etcd_version,
    }


def _budget(settings: Settings) -> float:
    """Seconds the whole run may take before the alarm stops it."""
    per_round = settings.warmup + settings.duration + 2 * CALL_TIMEOUT
    rounds = len(settings.concurrency) * settings.rounds * settings.targets
    rounds = rounds if settings.throughput else 0
    trials = settings.trials * (4 * CALL_TIMEOUT + 80) if settings.failover else 0
    return 300 + settings.fsync_seconds + rounds * per_round + trials


class _Alarm(BaseException):
    """The whole-run budget ran out."""


def _on_alarm(_signum: int, _frame: object) -> None:
    raise _Alarm


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Replicated writes of a 3-node kmsd cluster against a 3-node etcd"
        " cluster, leader failover, and the disk's fsync floor.",
    )
    parser.add_argument("--duration", type=float, help="measured seconds per round (5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each round (1)")
    parser.add_argument("--rounds", type=int, help="rounds per cluster, interleaved (3)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16, 64], help="calls in flight"
    )
    parser.add_argument(
        "--via",
        choices=("leader", "all"),
        default="leader",
        help="send writes to the leader (default) or spread them over all nodes",
    )
    parser.add_argument("--trials", type=int, help="failover trials (5)")
    parser.add_argument("--writers", type=int, default=16, help="failover writer threads (16)")
    parser.add_argument(
        "--client-attempts",
        type=int,
        help="KmsClient max_attempts in the failover trials (the client's default)",
    )
    parser.add_argument(
        "--single-node",
        action="store_true",
        help="also measure one kmsd node without replication (interleaved): the ceiling",
    )
    parser.add_argument(
        "--echo-ceiling",
        action="store_true",
        help="also measure servers answering CreateKey with no work at all, on grpc.aio"
        " and on gRPC's threaded server (bench.cluster_echo, interleaved): what the"
        " Python gRPC stacks answer by themselves",
    )
    parser.add_argument("--fsync-seconds", type=float, help="disk-floor sampling time (2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized run: 1 round of 1 s after 0.3 s warm-up, 1 failover trial",
    )
    parser.add_argument("--no-throughput", action="store_true", help="skip kmsd vs etcd")
    parser.add_argument("--no-failover", action="store_true", help="skip the failover trials")
    parser.add_argument("--workdir", type=Path, help="parent of the data dirs (system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    parser.add_argument("--profile", type=Path, help="py-spy every kmsd node; files here")
    parser.add_argument("--json", type=Path, help="also write all figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        concurrency=args.concurrency,
        duration=args.duration if args.duration is not None else (1.0 if quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 1.0),
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        via=args.via,
        trials=args.trials if args.trials is not None else (1 if quick else 5),
        writers=args.writers,
        client_attempts=args.client_attempts,
        fsync_seconds=(
            args.fsync_seconds if args.fsync_seconds is not None else (0.5 if quick else 2.0)
        ),
        throughput=not args.no_throughput,
        failover=not args.no_failover,
        single_node=args.single_node,
        echo_ceiling=args.echo_ceiling,
    )
    if settings.duration <= 0 or settings.warmup < 0 or settings.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --rounds >= 1")
    if any(c < 1 for c in settings.concurrency) or settings.writers < 1:
        parser.error("--concurrency and --writers values must be >= 1")
    if settings.trials < 1 or settings.fsync_seconds <= 0:
        parser.error("--trials must be >= 1 and --fsync-seconds > 0")
    return settings, args


def _report_json(
    settings: Settings,
    info: dict[str, Any],
    floor: DiskFloor,
    rows: list[Row],
    trials: list[Trial],
    started: float,
) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "machine": info,
        "goals": {"ratio": GOAL_RATIO, "failover_s": GOAL_FAILOVER_S},
        "wall_seconds": round(time.monotonic() - started, 1),
        "disk_floor": asdict(floor),
        "throughput": [
            {
                "concurrency": row.concurrency,
                "ratio": row.ratio,
                "cpu_ratio": row.cpu_ratio,
                "paired_ratios": row.paired_ratios,
                "median": {t: {a: row.median(t, a) for a in _MEDIANS} for t in row.rounds},
                "rounds": {t: [asdict(r) for r in rs] for t, rs in row.rounds.items()},
                **({"single_ratio": row.single_ratio()} if SINGLE in row.rounds else {}),
                # Each other target's median ops/s over the echo server's.
                **({"echo_ratios": row.echo_ratios()} if ECHO in row.rounds else {}),
                **(
                    {"threaded_echo_ratios": row.echo_ratios(THREADED_ECHO)}
                    if THREADED_ECHO in row.rounds
                    else {}
                ),
            }
            for row in rows
        ],
        "failover": [asdict(trial) for trial in trials],
    }


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    started = time.monotonic()
    load_start = os.getloadavg()[0]

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        etcd_binary, etcd_version = ensure_etcd(install=settings.throughput)
    except EtcdUnavailable as error:
        if settings.throughput:
            print(f"bench: {error}", file=sys.stderr)
            return 3
        etcd_binary, etcd_version = "", "not used"
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(math.ceil(_budget(settings)))
    children = Children()
    profiler = Profiler(args.profile)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kmsd-bench-cluster-", dir=args.workdir))
    rows: list[Row] = []
    trials: list[Trial] = []
    try:
        floor = disk_floor(tmp, settings.fsync_seconds)
        progress(
            f"disk floor in {tmp} ({floor.filesystem}): p50 {floor.p50_ms:.3f} ms,"
            f" p99 {floor.p99_ms:.3f} ms"
        )
        if settings.throughput:
            etcd_pb, etcd_grpc = etcd_stubs(tmp / "etcd-proto")
            kmsd = KmsdCluster(tmp / "kmsd", children).start()
            etcd = EtcdCluster(etcd_binary, tmp / "etcd", children, etcd_pb, etcd_grpc).start()
            ceilings: dict[str, Served] = {}
            if settings.single_node:
                ceilings[SINGLE] = KmsdCluster(
                    tmp / "kmsd-1", children, 1, replicated=False
                ).start()
            if settings.echo_ceiling:
                ceilings[ECHO] = EchoServer(tmp / "echo", children).start()
                ceilings[THREADED_ECHO] = EchoServer(
                    tmp / "echo-threads", children, ECHO_THREADS
                ).start()
            progress(
                f"kmsd {kmsd.endpoints} (pids {kmsd.pids}); etcd {etcd.endpoints}"
                f" (pids {etcd.pids})"
                + "".join(f"; {t} {c.endpoints} (pid {c.pids})" for t, c in ceilings.items())
                + f"; {settings.rounds} round(s) of {settings.duration:g} s"
                f" after {settings.warmup:g} s warm-up, concurrency {settings.concurrency}"
            )
            rows = asyncio.run(
                run_throughput(
                    kmsd, etcd, etcd_pb, etcd_grpc, settings, progress, profiler, ceilings
                )
            )
            children.stop_all()
        if settings.failover:
            cluster = KmsdCluster(tmp / "kmsd-failover", children).start()
            progress(f"failover: kmsd {cluster.endpoints}, {settings.writers} writers")
            trials = run_failover(cluster, settings, progress)
    except _Alarm:
        print("bench: the run exceeded its time budget; stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process started was stopped", file=sys.stderr)
        return 130
    except (grpc.RpcError, KmsClientError, RuntimeError, OSError) as error:
        print(f"bench: failed: {error}", file=sys.stderr)
        print(f"bench: logs under {tmp}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        signal.alarm(0)
        children.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench: data and logs kept in {tmp}", file=sys.stderr)

    info = machine(etcd_version)
    info["loadavg_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    print(
        "kmsd cluster bench: CreateKey on a 3-node kmsd cluster vs KV.Put"
        f" ({ETCD_VALUE_BYTES}-byte values) on a 3-node etcd cluster, calls via"
        f" {settings.via}; median of {settings.rounds} interleaved round(s) of"
        f" {settings.duration:g} s (warm-up {settings.warmup:g} s)"
        if rows
        else "kmsd cluster bench"
    )
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['platform']},"
        f" Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']},"
        f" etcd {info['etcd']}, kmsd at {info['commit']};"
        f" 1-min load average {load_start:.1f} at start,"
        f" {info['loadavg_1min']['end']:.1f} at end"
    )
    foreign = [r.foreign_cpu_pct for row in rows for rs in row.rounds.values() for r in rs]
    foreign += [t.foreign_cpu_pct for t in trials]
    if foreign:
        print(
            f"other load: processes outside this benchmark used median"
            f" {statistics.median(foreign):.0f} %, max {max(foreign):.0f} % of one core"
            f" (of {100 * (os.cpu_count() or 1)} %) during the measured rounds and trials"
        )
    print(
        f"disk floor: 4 KiB append + fdatasync on {floor.filesystem}: p50 {floor.p50_ms:.3f} ms,"
        f" p99 {floor.p99_ms:.3f} ms, mean {floor.mean_ms:.3f} ms ({floor.samples} samples)"
    )
    errors = 0
    if rows:
        print()
        print(format_table(rows))
        print()
        for row in rows:
            verdict = "meets" if row.ratio >= GOAL_RATIO else "BELOW"
            paired = ", ".join(f"{r:.2f}" for r in row.paired_ratios)
            print(
                f"ratio c={row.concurrency}: {row.ratio:.3f} ({verdict} goal {GOAL_RATIO});"
                f" per round: {paired}; server CPU ratio etcd/kmsd {row.cpu_ratio:.2f}"
            )
        if settings.single_node:
            print()
            print(
                "one kmsd node without replication (its single-node log), interleaved with"
                " the clusters: the most a kmsd cluster could do if replication were free"
            )
            print()
            print(format_single_table(rows))
        if settings.echo_ceiling:
            print()
            print(
                "a grpc.aio server answering CreateKey with a fixed empty response and no"
                " work (bench.cluster_echo, kmsd's server options), interleaved with the"
                " others: the ceiling kmsd's server stack puts on kmsd here"
            )
            print()
            print(format_echo_table(rows))
            print()
            print(
                f"the same on gRPC's threaded server ({ECHO_THREADS} worker threads),"
                " interleaved too: the other Python gRPC server"
            )
            print()
            print(format_threaded_echo_table(rows))
        errors = sum(row.errors for row in rows)
    if trials:
        print()
        print(failover_line(trials))
        default = inspect.signature(KmsClient).parameters["max_attempts"].default
        attempts = settings.client_attempts or f"default ({default})"
        print(
            f"  {settings.writers} writer threads and one crypto caller per survivor, the"
            f" KmsClient with max_attempts {attempts}; per trial:"
        )
        for index, trial in enumerate(trials, start=1):
            print(f"  {index}: {trial_line(trial)}")
    for name, summary in profiler.summaries.items():
        print(f"\nprofile {name} (py-spy, % of samples):\n{summary}")
    if args.json is not None:
        report = _report_json(settings, info, floor, rows, trials, started)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if errors:
        print(f"bench: {errors} write(s) failed; the figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
