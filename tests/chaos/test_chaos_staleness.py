"""Chaos: the staleness bound of Encrypt (DESIGN.md §4).

A node may check key state for Encrypt against its local applied state when it "heard
from the leader (a leader: from a quorum) within `[raft].max_staleness_ms`"; past that
it must use ReadIndex, so an Encrypt may succeed after a DisableKey completed only
within max_staleness of that completion (docs/checking.md; reference/replication.md
§3.2), and symmetrically may answer DisabledException after an EnableKey only within
that bound. Two ways a node breaks the bound:

* a paused leader (SIGSTOP, as a long GC pause or a stalled VM would): after SIGCONT
  it answers the Encrypts queued during the pause from its pre-pause state, although
  the others elected a new leader and disabled the keys meanwhile;
* a slow link: the leader's Raft messages to one follower arrive late (constant
  latency, nothing lost, responses undelayed). The follower keeps "hearing from the
  leader", but what it hears is old: its key states lag the cluster's by more than
  max_staleness while it still counts as fresh.
"""

from __future__ import annotations

import random
import threading
import time

from checks import fail, pace, relax_encrypts
from workload import Outcome, Workload

from kmsd.checker import HistoryRecorder, KeyStoreModel, check

LINK_DELAY_S = 0.8
TOGGLES = 6
ENCRYPT_CLIENTS = 12


def test_encrypt_on_resumed_paused_leader(make_cluster, seed):
    """Pause the leader; a new leader disables the keys; Encrypts sent to the paused node
    after that are served once it resumes: each must fail (DisabledException, or
    UNAVAILABLE), never succeed from the state it had before the pause."""
    cluster = make_cluster(3)
    bound_s = cluster.max_staleness_ms / 1000
    recorder = HistoryRecorder()
    workload = Workload(
        cluster.endpoints,
        recorder,
        tls=cluster.tls,
        seed=seed,
        direct_clients=0,
        failover_clients=0,
        op_timeout_s=10.0,
    )
    answers: list[Outcome] = []
    try:
        old = cluster.wait_leader()
        keys = [workload.one("create", node=old).detail for _ in range(3)]
        for key_id in keys:  # the old leader has used them: material unwrapped, state known
            assert workload.one("encrypt_allowed", key_id, node=old).detail == "ok"
        cluster.pause(old)
        new = cluster.wait_leader(timeout=10, among=[n for n in cluster.nodes if n != old])
        disabled_at = 0.0
        for key_id in keys:
            outcome = workload.one("disable", key_id, node=new)
            assert outcome.detail == "ok", outcome.detail
            disabled_at = outcome.ret
        pace(bound_s + 0.5)  # the schedule: the disables are now older than the bound
        threads = [
            threading.Thread(
                target=lambda i=i: answers.append(
                    workload.one("encrypt_allowed", keys[i % 3], node=old, client_id=100 + i)
                )
            )
            for i in range(9)
        ]
        for thread in threads:
            thread.start()
        pace(0.5)  # the Encrypts reach the paused node and wait in its socket buffers
        cluster.resume(old)
        for thread in threads:
            thread.join(30)
    finally:
        workload.close()
    stale = [a for a in answers if a.detail == "ok" and a.call - disabled_at > bound_s]
    cluster.note(f"Encrypts on resumed node {old}: {sorted(a.detail[:40] for a in answers)}")
    result = check(relax_encrypts(recorder.history(), bound_s), KeyStoreModel(), timeout_s=20)
    if stale or result.ok is False:
        fail(
            cluster,
            recorder,
            seed,
            [
                f"{len(stale)} of {len(answers)} Encrypts sent to node {old} while it was"
                f" paused, at least {min((a.call - disabled_at for a in stale), default=0):.2f}s"
                f" after node {new} (the new leader) disabled their keys, succeeded once node"
                f" {old} resumed (max_staleness_ms = {cluster.max_staleness_ms}). The resumed"
                " old leader counted its quorum contact in Raft ticks, and no tick passed"
                " while it was stopped, so it believed its contact fresh and used its"
                " pre-pause key states.",
                result.explanation,
            ],
            workload,
        )


def _stale_answers(
    toggles: list[Outcome], encrypts: list[Outcome], bound_s: float
) -> list[tuple[float, Outcome]]:
    """Encrypts whose answer contradicts a toggle that completed more than `bound_s`
    before they were called, with no later toggle overlapping them: (lag, encrypt)."""
    stale = []
    for enc in encrypts:
        if enc.result != "ok":
            continue  # indeterminate: says nothing
        done = [t for t in toggles if t.ret < enc.call - bound_s]
        if not done or any(t.call < enc.ret and t.ret >= enc.call - bound_s for t in toggles):
            continue
        last = done[-1]
        expected = "ok" if last.op == "enable" else "DisabledException"
        if enc.detail != expected:
            stale.append((enc.call - last.ret, enc))
    return stale


def test_encrypt_staleness_bound_on_slow_link(make_cluster, seed):
    """Toggle a key Disabled/Enabled through the leader while clients Encrypt under it
    on the follower behind the slow link; no answer may be staler than max_staleness."""
    rng = random.Random(seed)
    cluster = make_cluster(3, tick_ms=100, election_ticks=10)  # kmsd's default timings
    bound_s = cluster.max_staleness_ms / 1000
    recorder = HistoryRecorder()
    # Short deadlines: an Encrypt that went through ReadIndex (answered after two link
    # delays) is abandoned early, so the clients keep probing the follower.
    workload = Workload(
        cluster.endpoints,
        recorder,
        tls=cluster.tls,
        seed=seed,
        direct_clients=0,
        failover_clients=0,
        op_timeout_s=1.5,
    )
    stop = threading.Event()
    encrypts: list[Outcome] = []

    def hammer(client_id: int, key_id: str, node: int) -> None:
        pacing = random.Random(seed + client_id)
        while not stop.is_set():
            encrypts.append(workload.one("encrypt_allowed", key_id, node=node, client_id=client_id))
            # Random pacing, so the clients do not lock onto the rhythm of the slow link.
            time.sleep(pacing.uniform(0, LINK_DELAY_S / 2))

    threads: list[threading.Thread] = []
    toggles: list[Outcome] = []
    try:
        leader = cluster.wait_leader()
        follower = rng.choice([n for n in cluster.nodes if n != leader])
        created = workload.one("create", node=leader, client_id=1)
        assert created.result == "ok", created.detail
        key_id = created.detail
        cluster.set_delay(leader, follower, LINK_DELAY_S)
        pace(2 * LINK_DELAY_S)  # the schedule: let the slow link reach a steady state
        threads = [
            threading.Thread(target=hammer, args=(10 + i, key_id, follower))
            for i in range(ENCRYPT_CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for i in range(TOGGLES):
            toggle = workload.one("disable" if i % 2 == 0 else "enable", key_id, node=leader)
            assert toggle.result == "ok", toggle.detail
            toggles.append(toggle)
            pace(rng.uniform(1.0, 1.5))
        status = cluster.status(follower)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        workload.close()

    stale = _stale_answers(toggles, encrypts, bound_s)
    cluster.note(
        f"{len(encrypts)} Encrypts on follower {follower} behind a {LINK_DELAY_S}s link"
        f" (its last contact: {status.last_contact_ms} ms), {len(stale)} staler than"
        f" {bound_s}s"
    )
    # Many concurrent Encrypts on one key make a violating history expensive to search;
    # the direct count above is the verdict, the checker's is a second opinion.
    result = check(relax_encrypts(recorder.history(), bound_s), KeyStoreModel(), timeout_s=3)
    if stale or result.ok is False:
        worst = max(stale, key=lambda s: s[0], default=None)
        fail(
            cluster,
            recorder,
            seed,
            [
                f"{len(stale)} of {len(encrypts)} Encrypts on follower {follower} answered"
                f" from key state older than max_staleness_ms={cluster.max_staleness_ms}"
                + (
                    f"; worst: {worst[1].detail} {worst[0]:.2f}s after the opposite toggle"
                    " completed on the leader"
                    if worst
                    else ""
                )
                + f". The leader's messages reach node {follower} {LINK_DELAY_S}s late, so it"
                " keeps hearing from the leader (and counts as fresh) while what it applied"
                " is older than the bound: the age of the last message received does not"
                " bound the age of the state.",
                result.explanation,
            ],
            workload,
        )
