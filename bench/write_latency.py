"""`python -m bench.write_latency`: a lone writer's CreateKey latency, side by side,
against kmsd clusters that differ in their source tree or their configuration.

An A/B for changes on the write path whose effect is smaller than the run-to-run
spread of `bench.cluster` (which compares against etcd, not against another kmsd):
every variant's cluster is started at once, then the variants are measured in
interleaved rounds (1 s warm-up, then `--duration` seconds of CreateKeys in a loop,
one at a time, each with a fresh request_id, over one channel to the leader), so
they share the machine's moments alike. Reported per variant: the median of the
rounds' mean latencies, p50/p99 over all calls, writes/s, and the ratio of the
median to the first variant's.

    python -m bench.write_latency --variant base=../old-tree --variant new=.
    python -m bench.write_latency --single-node --variant on=. \
        --variant 'off=.:[audit]\nenabled = false'

A variant is `NAME=PATH` (a kmsd source tree: a checkout or `git worktree`, run with
this virtualenv) optionally followed by `:TOML`, appended to each node's config (`\n`
stands for a line break). Only 127.0.0.1 is used; every process is stopped on exit,
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from bench.cluster_kmsd import KmsdCluster
from bench.cluster_procs import REPO_ROOT, Children

CALL_TIMEOUT_S = 10.0


@dataclass
class Variant:
    name: str
    source: Path
    extra_config: str
    round_means_ms: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0


def parse_variant(text: str) -> Variant:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: give NAME=PATH[:TOML]")
    path, _, extra = rest.partition(":")
    source = Path(path or ".").resolve()
    if not (source / "kmsd" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"--variant {name}: {source} is not a kmsd source tree")
    extra = extra.replace("\\n", "\n")  # a one-line shell argument may say \n
    return Variant(name, source, f"\n{extra}\n" if extra else "")


def create_keys(stub: pb_grpc.KeyManagementServiceStub, seconds: float) -> list[float]:
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        request = pb.CreateKeyRequest(description="bench-latency", request_id=str(uuid.uuid4()))
        started = time.perf_counter()
        stub.CreateKey(request, timeout=CALL_TIMEOUT_S)
        latencies.append(time.perf_counter() - started)
    return latencies


def nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def report(variants: list[Variant]) -> str:
    base = statistics.median(variants[0].round_means_ms)
    lines = [
        "| variant | median of round means ms | p50 / p99 ms | writes/s | ratio to "
        f"{variants[0].name} | round means ms |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in variants:
        ordered = sorted(v.latencies_s)
        median = statistics.median(v.round_means_ms)
        lines.append(
            f"| {v.name} | {median:.3f} | {nearest_rank(ordered, 0.5) * 1e3:.2f} /"
            f" {nearest_rank(ordered, 0.99) * 1e3:.2f} | {v.calls / v.seconds:,.0f} |"
            f" {median / base:.3f} | {', '.join(f'{m:.2f}' for m in v.round_means_ms)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        help="NAME=PATH[:TOML] (repeatable; default: this tree alone)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--single-node", action="store_true", help="one unreplicated node each")
    parser.add_argument("--workdir", type=Path, help="parent of the clusters (default: /tmp)")
    parser.add_argument("--json", type=Path, help="also write every round here")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant or [Variant("this", REPO_ROOT, "")]
    if len({v.name for v in variants}) != len(variants):
        parser.error("variant names must differ")
    children = Children()
    with tempfile.TemporaryDirectory(prefix="kmsd-bench-latency-", dir=args.workdir) as tmp:
        channels: list[grpc.Channel] = []
        try:
            stubs = []
            for v in variants:
                cluster = KmsdCluster(
                    Path(tmp) / v.name,
                    children,
                    size=1 if args.single_node else 3,
                    replicated=not args.single_node,
                    source=v.source,
                    extra_config=v.extra_config,
                ).start()
                channels.append(grpc.insecure_channel(cluster.endpoint(cluster.leader())))
                stubs.append(pb_grpc.KeyManagementServiceStub(channels[-1]))
                print(f"{v.name}: {cluster.size} node(s) from {v.source}", file=sys.stderr)
            for number in range(1, args.rounds + 1):
                for v, stub in zip(variants, stubs, strict=True):
                    create_keys(stub, args.warmup)
                    started = time.monotonic()
                    latencies = create_keys(stub, args.duration)
                    v.seconds += time.monotonic() - started
                    v.calls += len(latencies)
                    v.latencies_s += latencies
                    v.round_means_ms.append(statistics.mean(latencies) * 1e3)
                    print(
                        f"round {number} {v.name}: mean {v.round_means_ms[-1]:.3f} ms",
                        file=sys.stderr,
                    )
        finally:
            for channel in channels:
                channel.close()
            children.stop_all()
    print(report(variants))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "single_node": args.single_node,
                    "duration_s": args.duration,
                    "variants": {
                        v.name: {
                            "source": str(v.source),
                            "extra_config": v.extra_config,
                            "round_means_ms": v.round_means_ms,
                            "calls": v.calls,
                        }
                        for v in variants
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
