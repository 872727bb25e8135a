"""Security overhead: the same kmsd data plane with authorization and auditing off and on.

`python -m bench.audit_overhead` starts single kmsd nodes as separate processes on
127.0.0.1, identical but for `[audit]`, `[auth]` and `[limits]`:
- "off": audit trail off, authorization off, rate limiting off;
- "on" (the defaults): every request authorized against the key's policy (the caller
  is not an administrator: the key's default policy allows it as the key's creator),
  rate-limited per principal, and recorded in the audit trail, each record durable
  (group commit, one fdatasync per batch);
- with `--nosync`, "nosync": as "on" but the audit trail with `fsync = false`;
- with `--audit-only`, "audit": the audit trail on, authorization and limits off.
It then drives the data plane's closed-loop load (bench.data_plane: Encrypt of 4096
bytes, Decrypt, GenerateDataKey, context {"purpose": "bench"}) against each, rounds
interleaved (off, on, ..., off, on, ...), and reports per operation and concurrency
the median ops/s, p50/p99, server CPU per call and the ratio on/off (the goal:
>= 0.8). Both sides run plaintext on loopback, so the figures isolate
authorization and auditing from TLS (which costs the same either way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from bench._process import ServerProcess
from bench.data_plane import (
    CALL_TIMEOUT,
    CONTEXT,
    OPERATIONS,
    PLAINTEXT_BYTES,
    Call,
    RoundResult,
    _calls,
    _raise_system_exit,
    machine,
    measure,
    process_tree,
)

GOAL = 0.8
_AUTH_ON = {"key_creators": ["anonymous"]}  # no administrator: policies are evaluated
_OFF = {"enabled": False}
_NO_LIMITS = {"requests_per_second": 0}
MODES: dict[str, dict[str, Any]] = {
    "off": {"audit": _OFF, "auth": _OFF, "limits": _NO_LIMITS},
    "on": {"audit": {"enabled": True, "fsync": True}, "auth": _AUTH_ON, "limits": {}},
    "nosync": {"audit": {"enabled": True, "fsync": False}, "auth": _AUTH_ON, "limits": {}},
    "audit": {"audit": {"enabled": True, "fsync": True}, "auth": _OFF, "limits": _NO_LIMITS},
}
_MEDIANS = ("ops_per_s", "p50_ms", "p99_ms", "server_cpu_us")


@dataclass
class Row:
    op: str
    concurrency: int
    rounds: dict[str, list[RoundResult]] = field(default_factory=dict)

    def median(self, target: str, attribute: str) -> float:
        return statistics.median(float(getattr(r, attribute)) for r in self.rounds[target])

    def ratio(self, target: str = "on") -> float:
        off = self.median("off", "ops_per_s")
        return self.median(target, "ops_per_s") / off if off else math.nan

    def cpu_ratio(self, target: str = "on") -> float:
        mine = self.median(target, "server_cpu_us")
        return self.median("off", "server_cpu_us") / mine if mine else math.nan

    @property
    def errors(self) -> int:
        return sum(r.errors for rounds in self.rounds.values() for r in rounds)


# -- the server side: one node, audit configured, ready line on stdout ---------------


async def _serve(data_dir: Path, mode: str) -> int:
    from kmsd.app import Node
    from kmsd.config import config_from_dict

    config = config_from_dict(
        {
            "node": {"data_dir": str(data_dir), "listen": "127.0.0.1:0", "log_level": "INFO"},
            **MODES[mode],
            # Plaintext on loopback: authorization and auditing are the subject, not TLS.
            "tls": {"plaintext": True},
        }
    )
    logging.basicConfig(level=config.log_level, stream=sys.stderr)
    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, node.request_stop)
    print(f"kmsd (security {mode}): serving on 127.0.0.1:{node.port}", flush=True)
    return await node.wait()


# -- the load side -----------------------------------------------------------------


async def _prepare(endpoint: str) -> tuple[grpc.aio.Channel, dict[str, Call]]:
    channel = grpc.aio.insecure_channel(endpoint)
    stub = pb_grpc.KeyManagementServiceStub(channel)
    key = await stub.CreateKey(
        pb.CreateKeyRequest(description="bench.audit_overhead"), timeout=CALL_TIMEOUT
    )
    key_id = key.key_metadata.key_id
    made = await stub.Encrypt(
        pb.EncryptRequest(
            key_id=key_id, plaintext=b"x" * PLAINTEXT_BYTES, encryption_context=CONTEXT
        ),
        timeout=CALL_TIMEOUT,
    )
    return channel, _calls(stub, key_id, made.ciphertext_blob)


async def run_benchmark(
    endpoints: dict[str, str],
    pids: dict[str, list[int]],
    args: argparse.Namespace,
) -> list[Row]:
    prepared = {target: await _prepare(endpoint) for target, endpoint in endpoints.items()}
    try:
        rows = []
        for op in args.ops:
            for concurrency in args.concurrency:
                row = Row(op, concurrency, {t: [] for t in endpoints})
                for index in range(args.rounds):
                    for target in endpoints:
                        result = await measure(
                            prepared[target][1][op],
                            concurrency,
                            args.warmup,
                            args.duration,
                            pids[target],
                        )
                        row.rounds[target].append(result)
                        if not args.quiet:
                            print(
                                f"  {op:<15} c={concurrency:<3} round {index + 1}/{args.rounds}"
                                f" {target:<6} {result.ops_per_s:8.0f} ops/s"
                                f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                                f"  server CPU {result.server_cpu_us:5.0f} µs/call",
                                file=sys.stderr,
                                flush=True,
                            )
                rows.append(row)
        return rows
    finally:
        for channel, _ in prepared.values():
            await channel.close()


def format_table(rows: list[Row], targets: list[str]) -> str:
    header = "| op | concurrency | " + " | ".join(f"{t} ops/s" for t in targets)
    header += " | ratio on/off | p50 / p99 ms " + " / ".join(targets)
    header += " | server CPU µs/call " + " / ".join(targets) + " | CPU ratio off/on |"
    lines = [header, "| --- | ---: |" + " ---: |" * (len(targets) + 4)]
    for row in rows:
        ops = " | ".join(f"{row.median(t, 'ops_per_s'):,.0f}" for t in targets)
        lat = " ; ".join(
            f"{row.median(t, 'p50_ms'):.2f} / {row.median(t, 'p99_ms'):.2f}" for t in targets
        )
        cpu = " / ".join(f"{row.median(t, 'server_cpu_us'):.0f}" for t in targets)
        lines.append(
            f"| {row.op} | {row.concurrency} | {ops} | {row.ratio():.2f} | {lat} | {cpu}"
            f" | {row.cpu_ratio():.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit_overhead",
        description="kmsd's data plane with authorization and the audit trail off and on.",
    )
    parser.add_argument("--serve", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help="measured seconds per round (5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each round (1)")
    parser.add_argument("--rounds", type=int, help="rounds per target, interleaved (3)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 1], help="calls in flight (64 1)"
    )
    parser.add_argument(
        "--ops", nargs="+", choices=OPERATIONS, default=list(OPERATIONS), help="operations"
    )
    parser.add_argument("--nosync", action="store_true", help="also audit with fsync = false")
    parser.add_argument(
        "--audit-only", action="store_true", help="also audit with authorization off"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: 1 round of 1 s, 0.3 s warm-up"
    )
    parser.add_argument("--json", type=Path, help="also write all figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    args = parser.parse_args(argv)
    defaults = (1.0, 0.3, 1) if args.quick else (5.0, 1.0, 3)
    args.duration = args.duration if args.duration is not None else defaults[0]
    args.warmup = args.warmup if args.warmup is not None else defaults[1]
    args.rounds = args.rounds if args.rounds is not None else defaults[2]
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --rounds >= 1")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return asyncio.run(_serve(args.data_dir, args.serve))
    signal.signal(signal.SIGTERM, _raise_system_exit)
    started = time.monotonic()
    targets = ["off", "on"] + (["nosync"] if args.nosync else [])
    targets += ["audit"] if args.audit_only else []
    budget = 60 + 2 * len(args.ops) * len(args.concurrency) * args.rounds * len(targets) * (
        args.warmup + args.duration + 3
    )
    with tempfile.TemporaryDirectory(prefix="kmsd-audit-bench-") as tmp:
        procs: dict[str, ServerProcess] = {}
        try:
            for target in targets:
                argv_ = [
                    sys.executable, "-m", "bench.audit_overhead", "--serve", target,
                    "--data-dir", str(Path(tmp) / target),
                ]  # fmt: skip
                procs[target] = ServerProcess(target, argv_, Path(tmp) / f"{target}.stderr.log")
                procs[target].start(timeout=60.0)
            endpoints = {t: procs[t].endpoint for t in targets}
            pids = {t: process_tree(procs[t].pid) for t in targets}
            try:
                rows = asyncio.run(
                    asyncio.wait_for(run_benchmark(endpoints, pids, args), timeout=budget)
                )
            except TimeoutError:
                print("bench: the run exceeded its time budget; stopped", file=sys.stderr)
                return 1
            audit_bytes = sum(
                p.stat().st_size for p in (Path(tmp) / "on" / "audit").glob("audit-*.jsonl")
            )
        finally:
            for process in procs.values():
                process.stop()
    info = machine()
    print(
        f"kmsd data plane, authorization + rate limits + audit off vs on ({PLAINTEXT_BYTES}-byte"
        f" plaintext, context {CONTEXT}); median of {args.rounds} round(s) of"
        f" {args.duration:g} s (warm-up {args.warmup:g} s)"
    )
    print(
        f"machine: {info['nproc']} CPUs, Python {info['python']}, grpcio {info['grpcio']};"
        f" audit log written by 'on': {audit_bytes / 1e6:.1f} MB"
    )
    print()
    print(format_table(rows, targets))
    print()
    for row in rows:
        verdict = "meets" if row.ratio() >= GOAL else "BELOW"
        extra = "".join(f"; {t}/off {row.ratio(t):.3f}" for t in targets if t not in ("off", "on"))
        print(
            f"ratio {row.op} c={row.concurrency}: on/off {row.ratio():.3f} ({verdict} goal"
            f" {GOAL}); server CPU ratio {row.cpu_ratio():.2f}{extra}"
        )
    if args.json is not None:
        report: dict[str, Any] = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "goal_ratio": GOAL,
            "wall_seconds": round(time.monotonic() - started, 1),
            "results": [
                {
                    "op": row.op,
                    "concurrency": row.concurrency,
                    "ratio_on_off": row.ratio(),
                    "cpu_ratio_off_on": row.cpu_ratio(),
                    "median": {t: {a: row.median(t, a) for a in _MEDIANS} for t in targets},
                    "rounds": {t: [asdict(r) for r in row.rounds[t]] for t in targets},
                }
                for row in rows
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    errors = sum(row.errors for row in rows)
    if errors:
        print(f"bench: {errors} call(s) failed; the figures are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
