"""Chaos: what a 3-node cluster promises about availability.

* One node down: writes and reads keep succeeding through the other two once a leader
  is elected (failures are counted per phase and printed).
* Majority lost: the survivor answers UNAVAILABLE within `[raft].request_timeout_seconds`
  (never hangs past it, never answers from its own state); once one node comes back
  the cluster recovers by itself, with every write acknowledged before the loss.
"""

from __future__ import annotations

import random
import time

import grpc
from checks import fail, pace, verify_run
from kms.v1 import kms_service_pb2 as pb
from workload import WRITES, Workload

from kmsd.checker import HistoryRecorder

READS = frozenset({"describe", "encrypt_allowed"})


def _phase_table(workload: Workload, phases: list[tuple[str, float, float]], dead: int) -> str:
    lines = [f"{'phase':<34} {'via':<18} {'writes ok/fail/unknown':>24} {'reads':>16}"]
    for name, since, until in phases:
        for label, via in (
            ("failover clients", lambda v: v == "failover"),
            ("direct, live nodes", lambda v: v.startswith("node-") and v != f"node-{dead}"),
            (f"direct, node {dead}", lambda v: v == f"node-{dead}"),
        ):
            w = workload.counts(since, until, ops=WRITES, via=via)
            r = workload.counts(since, until, ops=READS, via=via)
            lines.append(
                f"{name:<34} {label:<18} {w['ok']:>8}/{w['fail']}/{w['unknown']:<8}"
                f" {r['ok']:>8}/{r['fail']}/{r['unknown']}"
            )
    return "\n".join(lines)


def test_chaos_one_node_down_stays_available(make_cluster, seed):
    """Kill the leader (or, one run in three or so, a follower) and keep it down: after
    the election window, >= 95% of writes and of reads through the failover client, and
    through direct calls to the two live nodes, succeed."""
    rng = random.Random(seed)
    cluster = make_cluster(3)
    recorder = HistoryRecorder()
    workload = Workload(
        cluster.endpoints,
        recorder,
        tls=cluster.tls,
        seed=seed,
        direct_clients=3,
        failover_clients=3,
        think_s=0.02,
    )
    t0 = time.monotonic()
    workload.start()
    try:
        pace(2.0)
        victim = cluster.wait_leader()
        if rng.random() < 0.3:
            victim = rng.choice([n for n in cluster.nodes if n != victim])
        t1 = time.monotonic()
        cluster.kill(victim)
        window = 3 * cluster.election_timeout_s  # detection + pre-vote + vote, with margin
        pace(window + 4.0)
        t2 = time.monotonic()
        cluster.start_nodes([victim])
        pace(2.0)
        t3 = time.monotonic()
    finally:
        workload.close()
    phases = [
        ("all up", t0, t1),
        (f"node {victim} down, election window", t1, t1 + window),
        (f"node {victim} down, after election", t1 + window, t2),
        ("restarted", t2, t3),
    ]
    table = _phase_table(workload, phases, victim)
    cluster.note("availability per phase:\n" + table)

    problems = []
    since, until = t1 + window, t2
    for label, via in (
        ("failover clients", lambda v: v == "failover"),
        ("direct calls to live nodes", lambda v: v.startswith("node-") and v != f"node-{victim}"),
    ):
        for kind, ops in (("writes", WRITES), ("reads", READS)):
            counts = workload.counts(since, until, ops=ops, via=via)
            total = sum(counts.values())
            if counts["ok"] < 5 or counts["ok"] < 0.95 * total:
                problems.append(f"{label}, {kind}: only {counts['ok']} of {total} succeeded")
    if problems:
        fail(cluster, recorder, seed, [*problems, table], workload)
    verify_run(cluster, workload, recorder, seed=seed)


def test_chaos_majority_lost(make_cluster, seed):
    """2 of 3 nodes killed: the survivor refuses writes and reads with UNAVAILABLE within
    the request timeout; one node back, the cluster recovers by itself and has every
    write acknowledged before the loss."""
    rng = random.Random(seed)
    cluster = make_cluster(3)
    recorder = HistoryRecorder()
    workload = Workload(
        cluster.endpoints,
        recorder,
        tls=cluster.tls,
        seed=seed,
        direct_clients=2,
        failover_clients=2,
    )
    try:
        workload.start()
        pace(2.0)
        workload.stop()
        acked_before = set(workload.acked_creates)
        assert acked_before, "no write was acknowledged before the loss"
        key_id = sorted(acked_before)[0]

        survivor = rng.choice(list(cluster.nodes))
        lost = [n for n in cluster.nodes if n != survivor]
        for node in lost:
            cluster.kill(node)
        bound = cluster.request_timeout_s + 2.0
        slow = []
        for op in ("create", "enable", "describe", "encrypt_allowed", "disable"):
            outcome = workload.one(op, "" if op == "create" else key_id, node=survivor)
            took = outcome.ret - outcome.call
            cluster.note(f"on survivor {survivor}: {op} -> {outcome.detail[:90]} in {took:.2f}s")
            if outcome.result != "unknown" or not outcome.detail.startswith("UNAVAILABLE"):
                slow.append(f"{op} answered {outcome.result} {outcome.detail!r}, not UNAVAILABLE")
            if took > bound:
                slow.append(f"{op} took {took:.2f}s, more than {bound:.1f}s")
        # The raw RPC too, with a long client deadline: it must not be the deadline that ends it.
        started = time.monotonic()
        try:
            cluster.kms(survivor).CreateKey(pb.CreateKeyRequest(description="x"), timeout=30)
            slow.append("CreateKey without a quorum succeeded")
        except grpc.RpcError as error:
            took = time.monotonic() - started
            if error.code() != grpc.StatusCode.UNAVAILABLE or took > bound:
                slow.append(f"raw CreateKey: {error.code().name} after {took:.2f}s")
        workload.unknown_creates += 1  # that create may still commit later
        assert not slow, f"seed {seed}: without a quorum:\n" + "\n".join(slow)

        back = rng.choice(lost)
        cluster.start_nodes([back])
        leader = cluster.wait_leader(timeout=20, among=[survivor, back])
        cluster.note(f"node {leader} leads {survivor} and {back}")
        for node in (survivor, back):
            present = cluster.list_keys(node)
            missing = acked_before - present
            assert not missing, f"seed {seed}: node {node} lost acknowledged keys {missing}"
        outcome = workload.one("create", node=None)
        assert outcome.result == "ok", f"seed {seed}: no write after recovery: {outcome.detail}"

        workload.start()
        pace(1.5)
        third = next(n for n in lost if n != back)
        cluster.start_nodes([third])
        pace(1.5)
    finally:
        workload.close()
    verify_run(cluster, workload, recorder, seed=seed)
