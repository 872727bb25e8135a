"""Chaos: the whole cluster killed at once, and torn WAL tails.

A torn tail is what a crash in the middle of a WAL append leaves: random bytes, a
record cut short, or zero-filled space after the last record of the last segment. The
node must cut it off on start (keeping a `.broken` copy), log the repair, and rejoin;
nothing acknowledged may be lost.
"""

from __future__ import annotations

import random

from checks import chaos_run, pace
from cluster import ChaosCluster
from workload import Workload


def test_chaos_whole_cluster_kill_and_restart(make_cluster, seed):
    """kill -9 of every node at once under load, twice; all restart on their data dirs."""

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        for _ in range(2):
            cluster.kill_all()
            pace(rng.uniform(0.2, 1.0))
            cluster.start_nodes(cluster.nodes)
            cluster.note(f"node {cluster.wait_leader()} leads after the restart")
            pace(rng.uniform(1.5, 2.5))

    # The schedule ends with a whole-cluster restart already: no extra one before checking.
    chaos_run(make_cluster, seed, faults, restart_all=False)


def _repairs(cluster: ChaosCluster, node_id: int) -> int:
    return sum(1 for n, _ in cluster.grep_logs("torn tail was repaired") if n == node_id)


def test_chaos_torn_wal_tail(make_cluster, seed):
    """A follower, then the leader, then one node of a whole-cluster crash restart with a
    torn WAL tail; each repairs it, rejoins and catches up."""

    def restart_torn(cluster: ChaosCluster, rng: random.Random, node: int, kind: str) -> None:
        before = _repairs(cluster, node)
        cluster.tear_wal_tail(node, kind, rng.randrange(2**32))
        cluster.start_nodes([node])
        assert _repairs(cluster, node) == before + 1, (
            f"node {node} did not report repairing its torn WAL tail:\n"
            + cluster.log_tail(node, 20)
        )
        broken = sorted(cluster.nodes[node].wal_dir.glob("*.broken*"))
        assert broken, f"node {node} kept no .broken copy of the cut bytes"

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        leader = cluster.wait_leader()
        follower = rng.choice([n for n in cluster.nodes if n != leader])
        cluster.kill(follower)
        pace(rng.uniform(0.5, 1.5))
        restart_torn(cluster, rng, follower, "garbage")
        pace(rng.uniform(1.0, 1.5))

        leader = cluster.wait_leader()
        cluster.kill(leader)
        pace(rng.uniform(0.5, 1.5))
        restart_torn(cluster, rng, leader, "partial")
        pace(rng.uniform(1.0, 1.5))

        cluster.kill_all()
        victim = rng.choice(list(cluster.nodes))
        cluster.tear_wal_tail(victim, "zeros", rng.randrange(2**32))
        before = _repairs(cluster, victim)
        cluster.start_nodes(cluster.nodes)
        assert _repairs(cluster, victim) == before + 1
        cluster.note(f"node {cluster.wait_leader()} leads after the restart")
        pace(rng.uniform(1.0, 2.0))

    chaos_run(make_cluster, seed, faults, restart_all=False)
