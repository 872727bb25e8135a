"""Chaos: kill -9 the leader or a follower under load, and SIGSTOP/SIGCONT the leader.

Every run ends with `verify_run`: whole-cluster restart, convergence, the set check on
every node, identical key states, and the linearizability check of the history.
"""

from __future__ import annotations

import random

from checks import chaos_run, pace
from cluster import ChaosCluster
from workload import Workload


def test_chaos_kill_leader(make_cluster, seed):
    """The leader crashes twice under load; a new one is elected among the survivors each
    time, and the old leader restarts on its data directory and catches up."""

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        for _ in range(2):
            leader = cluster.wait_leader()
            cluster.kill(leader)
            survivors = [n for n in cluster.nodes if n != leader]
            new = cluster.wait_leader(timeout=10, among=survivors)
            cluster.note(f"node {new} leads after node {leader} was killed")
            pace(rng.uniform(1.0, 2.5))
            cluster.start_nodes([leader])
            pace(rng.uniform(1.0, 2.0))

    chaos_run(make_cluster, seed, faults)


def test_chaos_kill_followers(make_cluster, seed):
    """Each follower crashes in turn under load (the leader keeps a quorum), then one
    follower is killed again right after it restarted, before it caught up."""

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        leader = cluster.wait_leader()
        followers = [n for n in cluster.nodes if n != leader]
        rng.shuffle(followers)
        for follower in followers:
            cluster.kill(follower)
            pace(rng.uniform(1.0, 2.5))
            cluster.start_nodes([follower])
            pace(rng.uniform(0.5, 1.5))
        flapping = followers[0]
        cluster.kill(flapping)
        cluster.start_nodes([flapping])
        cluster.kill(flapping)
        pace(rng.uniform(0.5, 1.0))
        cluster.start_nodes([flapping])

    chaos_run(make_cluster, seed, faults)


def test_chaos_pause_leader(make_cluster, seed):
    """SIGSTOP the leader for longer than an election timeout, twice: the others elect a
    new leader; once resumed, the old leader must step down and never answer from the
    state it had before the pause (stale reads, Encrypt under a key disabled meanwhile).
    Then a follower is paused: requests queued at it must not see its old state either."""

    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        for _ in range(2):
            leader = cluster.wait_leader()
            cluster.pause(leader)
            others = [n for n in cluster.nodes if n != leader]
            new = cluster.wait_leader(timeout=10, among=others)
            cluster.note(f"node {new} leads while node {leader} is paused")
            pace(rng.uniform(1.5, 3.0))
            cluster.resume(leader)
            pace(rng.uniform(1.0, 2.0))
        follower = rng.choice([n for n in cluster.nodes if n != cluster.wait_leader()])
        cluster.pause(follower)
        pace(rng.uniform(1.5, 2.5))
        cluster.resume(follower)
        pace(1.0)

    # Client deadlines longer than the pauses: requests queued at a paused node are
    # answered when it resumes, which is where stale answers would show.
    chaos_run(make_cluster, seed, faults, workload_options={"op_timeout_s": 6.0})
