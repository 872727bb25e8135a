"""Chaos soak: a seeded random schedule of every fault, for as long as asked.

Skipped unless `KMSD_CHAOS_SECONDS` is set (`make chaos` sets it to 600). One run per
seed in `KMSD_CHAOS_SEEDS` (comma-separated; default: one fresh seed), on a cluster of
`KMSD_CHAOS_NODES` nodes (3 or 5), with the faults named in `KMSD_CHAOS_FAULTS`
(comma-separated; default: all of `ALL_FAULTS`). Snapshots are taken every 500 commands so snapshot
installs and log compaction are exercised too.

Faults, one at a time, each held for 1-4 s (long outages 8-15 s) with 1-3 s of healthy
running in between: kill -9 of the leader or any node, SIGSTOP of the leader or any
node, the leader or a node isolated (black hole or connection resets), a minority /
majority split, a one-way cut, slow links, a whole-cluster kill and restart, a torn WAL
tail on a killed node, and a follower down long enough to need a snapshot.
"""

from __future__ import annotations

import os
import random

import pytest
from checks import chaos_run, pace
from cluster import ChaosCluster
from proxy import Mode
from workload import Workload

SECONDS = float(os.environ.get("KMSD_CHAOS_SECONDS") or 0)
SEEDS = [int(s) for s in (os.environ.get("KMSD_CHAOS_SEEDS") or "").split(",") if s.strip()] or [
    random.SystemRandom().randrange(1, 10**9)
]
NODES = int(os.environ.get("KMSD_CHAOS_NODES") or 3)
ALL_FAULTS = (
    "kill-leader",
    "kill-any",
    "pause-leader",
    "pause-any",
    "isolate-leader",
    "isolate-any",
    "split",
    "one-way",
    "slow-links",
    "restart-all",
    "torn-tail",
    "long-outage",
)
# KMSD_CHAOS_FAULTS=kill-any,split,...: only those faults (e.g. to leave out one whose
# known bug would fail every run).
FAULTS = [
    f.strip() for f in (os.environ.get("KMSD_CHAOS_FAULTS") or ",".join(ALL_FAULTS)).split(",")
]
assert set(FAULTS) <= set(ALL_FAULTS), f"unknown faults in KMSD_CHAOS_FAULTS: {FAULTS}"
# Slow links stay under this; Encrypts are allowed that much more staleness twice over
# (a known issue reproduced by test_chaos_staleness; here the soak looks for others).
MAX_LINK_DELAY_S = 0.2

pytestmark = pytest.mark.skipif(
    not SECONDS, reason="the soak runs when KMSD_CHAOS_SECONDS is set (`make chaos`)"
)


def _nemesis(cluster: ChaosCluster, rng: random.Random, end: float, clock) -> None:
    nodes = list(cluster.nodes)
    minority = cluster.size - cluster.quorum
    while clock() < end:
        fault = rng.choice(FAULTS)
        cluster.note(f"nemesis: {fault}")
        leader = cluster.wait_leader(timeout=30)
        hold = rng.uniform(1.0, 4.0)
        if fault in ("kill-leader", "kill-any", "torn-tail", "long-outage"):
            victim = leader if fault == "kill-leader" else rng.choice(nodes)
            cluster.kill(victim)
            pace(rng.uniform(8.0, 15.0) if fault == "long-outage" else hold)
            if fault == "torn-tail":
                kind = rng.choice(["garbage", "partial", "zeros"])
                cluster.tear_wal_tail(victim, kind, rng.randrange(2**32))
            cluster.start_nodes([victim])
        elif fault in ("pause-leader", "pause-any"):
            victim = leader if fault == "pause-leader" else rng.choice(nodes)
            cluster.pause(victim)
            pace(hold)
            cluster.resume(victim)
        elif fault in ("isolate-leader", "isolate-any"):
            victim = leader if fault == "isolate-leader" else rng.choice(nodes)
            cluster.isolate(victim, rng.choice([Mode.HOLD, Mode.RESET]))
            pace(hold)
            cluster.heal_network()
        elif fault == "split":
            shuffled = rng.sample(nodes, len(nodes))
            cluster.partition([shuffled[:minority], shuffled[minority:]])
            pace(hold)
            cluster.heal_network()
        elif fault == "one-way":
            src, dst = rng.sample(nodes, 2)
            if rng.random() < 0.5:
                src = leader
                dst = rng.choice([n for n in nodes if n != leader])
            cluster.block(src, dst)
            pace(hold)
            cluster.heal_network()
        elif fault == "slow-links":
            for src in nodes:
                for dst in nodes:
                    if src != dst and rng.random() < 0.5:
                        cluster.set_delay(
                            src, dst, rng.uniform(0, MAX_LINK_DELAY_S * 0.75), MAX_LINK_DELAY_S / 4
                        )
            pace(hold)
            cluster.heal_network()
        elif fault == "restart-all":
            cluster.kill_all()
            pace(rng.uniform(0.2, 1.5))
            cluster.start_nodes(nodes)
        pace(rng.uniform(1.0, 3.0))


@pytest.mark.timeout(SECONDS * len(SEEDS) + 900 if SECONDS else 300)
@pytest.mark.parametrize("soak_seed", SEEDS)
def test_chaos_soak(make_cluster, soak_seed):
    import time

    print(f"\n[chaos] soak: seed {soak_seed}, {SECONDS:.0f}s, {NODES} nodes, faults {FAULTS}")

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        _nemesis(cluster, rng, time.monotonic() + SECONDS, time.monotonic)

    chaos_run(
        make_cluster,
        soak_seed,
        faults,
        size=NODES,
        cluster_options={"snapshot_every": 500, "lifetime_s": SECONDS + 1800},
        workload_options={"direct_clients": NODES + 1},
        extra_staleness_s=2 * MAX_LINK_DELAY_S,
    )
