"""The end of every chaos run: heal, settle, and check what the clients saw.

`verify_run` heals every fault, optionally kills and restarts the whole cluster (so only
what reached the disks counts), waits until every node applied the leader's commit
index, then checks:

* durability: every acknowledged CreateKey is listed (ListKeys, a linearizable read)
  on every node, nothing unexplained appears (`check_acknowledged_present`);
* convergence: every node describes every key in the same state and applied the same
  index;
* linearizability of the recorded history (`kmsd.checker.check` with `KeyStoreModel`).
  Encrypt may use a node's local state if it heard from the leader within
  `[raft].max_staleness_ms` (DESIGN.md §4), so an Encrypt is checked as if it had been
  called that much earlier: "ok" is allowed from a key disabled less than that bound
  before, and from nothing older;
* the cluster still takes writes;
* the audit trails, once every node is stopped cleanly: each node's chain verifies,
  its records of mutations come in log order, each log index at most once, and every
  acknowledged CreateKey has its "ok" record on some node (the node that answered it
  wrote it when the command applied, or again from its log after a crash).

On a problem it saves the history as JSONL next to the node logs and raises
AssertionError naming the seed, the files, and the checker's explanation.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from audit_records import audit_records
from cluster import ChaosCluster
from kms.v1 import kms_service_pb2 as pb
from workload import KEY_STATES, Workload

from kms_client import KmsClient
from kms_client.audit_verify import audit_files, verify
from kmsd.checker import (
    HistoryRecorder,
    KeyStoreModel,
    Operation,
    check,
    check_acknowledged_present,
)

CHECK_BUDGET_S = 60.0


def relax_encrypts(history: list[Operation], staleness_s: float) -> list[Operation]:
    """The history with every Encrypt's call moved `staleness_s` earlier (see above)."""
    shift = int(staleness_s * 1e9)
    if not shift:
        return history
    return [
        dataclasses.replace(op, call=op.call - shift) if op.op == "encrypt_allowed" else op
        for op in history
    ]


def final_write(cluster: ChaosCluster, deadline_s: float = 20.0) -> str:
    """A CreateKey through the failover client must succeed once healed."""
    with KmsClient(
        cluster.endpoints, tls=cluster.tls, timeout=3.0, max_attempts=20, max_backoff=0.5
    ) as client:
        end = time.monotonic() + deadline_s
        while True:
            try:
                return client.create_key(description="after-heal").key_metadata.key_id
            except Exception:
                if time.monotonic() > end:
                    raise


def verify_run(
    cluster: ChaosCluster,
    workload: Workload,
    recorder: HistoryRecorder,
    *,
    seed: int,
    restart_all: bool = True,
    check_timeout_s: float = CHECK_BUDGET_S,
    extra_staleness_s: float = 0.0,
) -> None:
    """See the module docstring. Call after `workload.stop()`. `extra_staleness_s`
    widens the Encrypt allowance (the soak's slow links; see test_chaos_staleness)."""
    problems: list[str] = []
    history = recorder.history()
    cluster.note(f"workload: {workload.summary()}")
    cluster.heal()
    if restart_all:
        cluster.kill_all()
        cluster.start_nodes(cluster.nodes)
    commit = cluster.wait_converged()
    cluster.note(f"converged at index {commit}")

    present = {f"n{i}": cluster.list_keys(i, min_commit_index=commit) for i in cluster.nodes}
    acked = set(workload.acked_creates)
    problems += check_acknowledged_present(
        acked, present, unidentified_attempts=workload.unknown_creates
    )
    unacked = set().union(*present.values()) - acked
    cluster.note(
        f"set check: {len(acked)} acknowledged creates, {workload.unknown_creates} with a lost"
        f" answer; {len(present['n1'])} keys on node 1, {len(unacked)} present but never"
        " acknowledged (creates whose answer was lost)"
    )

    every_key = sorted(set().union(*present.values()))

    def state_on(node_id: int, key_id: str) -> str:
        # A healed cluster may still hold an election (a busy machine, fast Raft timings):
        # UNAVAILABLE is retried for a while; only an answer counts.
        end = time.monotonic() + 30
        while True:
            try:
                meta = (
                    cluster.kms(node_id)
                    .DescribeKey(
                        pb.DescribeKeyRequest(key_id=key_id, min_commit_index=commit), timeout=10
                    )
                    .key_metadata
                )
                return KEY_STATES.get(meta.key_state, str(meta.key_state))
            except grpc.RpcError as error:
                retry = error.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retry or time.monotonic() > end:
                    return f"error {error.code().name}"
                time.sleep(0.1)  # pacing of the retry

    def states_of(key_id: str) -> dict[int, str]:
        return {node_id: state_on(node_id, key_id) for node_id in cluster.nodes}

    with ThreadPoolExecutor(4) as pool:
        diverged = [
            f"{key_id}: {states}"
            for key_id, states in zip(every_key, pool.map(states_of, every_key), strict=True)
            if len(set(states.values())) != 1
        ]
    if diverged:
        problems.append(f"nodes disagree on {len(diverged)} keys: " + "; ".join(diverged[:10]))
    try:
        # Still (or again, after any election since) every node at the same applied index.
        cluster.wait_converged()
    except AssertionError as error:
        problems.append(str(error))

    relaxed = relax_encrypts(history, cluster.max_staleness_ms / 1000 + extra_staleness_s)
    started = time.monotonic()
    result = check(relaxed, KeyStoreModel(), timeout_s=check_timeout_s)
    cluster.note(
        f"linearizability: {len(history)} operations, {len(result.partitions)} keys,"
        f" verdict {result.ok} in {time.monotonic() - started:.1f}s"
    )
    if result.ok is False:
        problems.append("history is NOT linearizable:\n" + result.explanation)
    elif result.ok is None:
        # Out of budget is not a verdict; say so loudly but do not fail on it.
        cluster.note("linearizability: undecided (time budget ran out)\n" + result.explanation)

    try:
        final_write(cluster)
    except Exception as error:
        problems.append(f"the healed cluster does not take writes: {error!r}")

    problems += check_audit_trails(cluster, acked)
    if problems:
        fail(cluster, recorder, seed, problems, workload)


def check_audit_trails(cluster: ChaosCluster, acked: set[str]) -> list[str]:
    """Stops every node cleanly, then checks their audit logs (see the module docstring)."""
    cluster.stop_all()
    problems: list[str] = []
    recorded: set[str] = set()
    for node_id, node in cluster.nodes.items():
        directory = node.data_dir / "audit"
        report = verify(audit_files(directory))
        if not report.ok:
            problems.append(f"node {node_id}'s audit trail does not verify: {report.first_bad}")
        indices = []
        for record in audit_records(directory):
            detail = record.get("detail") or {}
            if "log_index" in detail:
                indices.append(detail["log_index"])
            if record["operation"] == "CreateKey" and record["outcome"] == "ok":
                recorded.add(str(record["key_arn"]).rpartition("/")[2])
        if indices != sorted(set(indices)):
            problems.append(f"node {node_id}'s records of mutations are not in log order, once")
    missing = acked - recorded
    cluster.note(f"audit: {len(acked) - len(missing)} of {len(acked)} acknowledged creates found")
    if missing:
        problems.append(
            f"{len(missing)} acknowledged CreateKeys have no audit record: {sorted(missing)[:5]}"
        )
    return problems


def fail(
    cluster: ChaosCluster,
    recorder: HistoryRecorder,
    seed: int,
    problems: list[str],
    workload: Workload | None = None,
) -> None:
    """Saves the history and raises an AssertionError that says where everything is."""
    path = save_history(cluster, recorder, workload)
    raise AssertionError(
        f"chaos run failed (seed {seed}; rerun with KMSD_CHAOS_SEED={seed}).\n"
        f"history: {path}\nfault timeline: {cluster.root / 'events.log'}"
        f"\nnode logs: {cluster.root}/node-*.log\n\n" + "\n\n".join(problems)
    )


def save_history(
    cluster: ChaosCluster, recorder: HistoryRecorder, workload: Workload | None = None
) -> Path:
    """Writes history.jsonl, events.log (the fault timeline, also timed like the
    checker's explanations: seconds since the first recorded call) and, given the
    workload, outcomes.jsonl (which node answered each operation) to the cluster dir."""
    history = recorder.history()
    if history:
        cluster.history_origin_ns = min(op.call for op in history)
    path = cluster.root / "history.jsonl"
    recorder.to_jsonl(path)
    (cluster.root / "events.log").write_text("\n".join(cluster.timeline()) + "\n")
    if workload is not None:
        workload.save_outcomes(cluster.root / "outcomes.jsonl")
    return path


def pace(seconds: float) -> None:
    """Lets the workload run between two faults: the schedule, not a wait for state."""
    time.sleep(seconds)


Faults = Callable[[ChaosCluster, random.Random, Workload], None]


def chaos_run(
    make_cluster: Callable[..., ChaosCluster],
    seed: int,
    faults: Faults,
    *,
    size: int = 3,
    cluster_options: dict[str, Any] | None = None,
    workload_options: dict[str, Any] | None = None,
    restart_all: bool = True,
    warmup_s: float = 0.5,
    cooldown_s: float = 0.5,
    extra_staleness_s: float = 0.0,
) -> tuple[ChaosCluster, Workload]:
    """Starts a cluster and the workload, runs `faults(cluster, rng, workload)`, stops the
    workload and checks the run (`verify_run`). The history is saved if anything fails."""
    rng = random.Random(seed)
    cluster = make_cluster(size, **(cluster_options or {}))
    recorder = HistoryRecorder()
    workload = Workload(
        cluster.endpoints, recorder, tls=cluster.tls, seed=seed, **(workload_options or {})
    )
    workload.start()
    try:
        try:
            pace(warmup_s)
            faults(cluster, rng, workload)
            pace(cooldown_s)
        finally:
            workload.close()
        verify_run(
            cluster,
            workload,
            recorder,
            seed=seed,
            restart_all=restart_all,
            extra_staleness_s=extra_staleness_s,
        )
    except BaseException:
        path = save_history(cluster, recorder, workload)
        print(f"[chaos] seed {seed}: history saved to {path}")
        raise
    return cluster, workload
